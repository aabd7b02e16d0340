package rankd.client;

import static org.junit.jupiter.api.Assertions.assertArrayEquals;
import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertInstanceOf;
import static org.junit.jupiter.api.Assertions.assertThrows;
import static org.junit.jupiter.api.Assertions.assertTrue;

import com.google.gson.Gson;
import com.google.gson.JsonArray;
import com.google.gson.JsonObject;
import com.google.gson.JsonParser;
import java.net.ServerSocket;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.time.Duration;
import java.util.ArrayList;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;
import java.util.concurrent.CompletableFuture;
import org.junit.jupiter.api.Assumptions;
import org.junit.jupiter.api.Test;

/** The Java client against the real daemon. */
class RankdClientTest {
  /** One Adult request: column name -> double[] or String[]. */
  record Case(int n, Map<String, Object> columns) {}

  static List<Case> adultCases(int count, int rows) throws Exception {
    Path csv = Daemon.REPO.resolve("../shared/data/adult/test.csv");
    if (!Files.exists(csv)) {
      Assumptions.abort("../shared/data/adult is not beside the repository");
    }
    List<String> lines = Files.readAllLines(csv, StandardCharsets.UTF_8);
    String[] header = lines.get(0).split(",");
    List<Case> out = new ArrayList<>();
    for (int k = 0; k < count; k++) {
      List<String[]> chunk = new ArrayList<>();
      for (int r = 1 + k * rows; r < 1 + (k + 1) * rows; r++) {
        chunk.add(lines.get(r).split(","));
      }
      Map<String, Object> cols = new LinkedHashMap<>();
      for (int j = 0; j < header.length; j++) {
        if (header[j].equals("label")) {
          continue;
        }
        String[] s = new String[chunk.size()];
        for (int i = 0; i < s.length; i++) {
          s[i] = chunk.get(i)[j];
        }
        try {
          double[] d = new double[s.length];
          for (int i = 0; i < s.length; i++) {
            d[i] = Double.parseDouble(s[i]);
          }
          cols.put(header[j], d);
        } catch (NumberFormatException e) {
          cols.put(header[j], s);
        }
      }
      out.add(new Case(chunk.size(), cols));
    }
    return out;
  }

  static ScoreRequest request(ScoreRequest r, Case c) {
    return request(r, c, "adult");
  }

  static ScoreRequest request(ScoreRequest r, Case c, String model) {
    r.reset(model, c.n());
    for (var e : c.columns().entrySet()) {
      if (e.getValue() instanceof double[] d) {
        r.column(e.getKey(), d, null);
      } else {
        r.column(e.getKey(), (String[]) e.getValue(), null);
      }
    }
    return r;
  }

  /** rankd-tool score on the same requests: the scores. */
  static List<float[]> reference(List<Case> cases) throws Exception {
    List<float[]> res = new ArrayList<>();
    for (JsonObject line : referenceLines(cases, "examples/models/adult/1/model.rkm")) {
      res.add(floats(line.getAsJsonArray("scores")));
    }
    return res;
  }

  static float[] floats(JsonArray a) {
    float[] f = new float[a.size()];
    for (int i = 0; i < f.length; i++) {
      f[i] = a.get(i).getAsFloat();
    }
    return f;
  }

  /** rankd-tool score on the same requests with the model file {@code model}: its lines. */
  static List<JsonObject> referenceLines(List<Case> cases, String model) throws Exception {
    Path jsonl = Files.createTempFile("rankd-java", ".jsonl");
    StringBuilder sb = new StringBuilder();
    Gson gson = new Gson();
    for (Case c : cases) {
      JsonArray items = new JsonArray();
      for (int i = 0; i < c.n(); i++) {
        JsonObject item = new JsonObject();
        for (var e : c.columns().entrySet()) {
          if (e.getValue() instanceof double[] d) {
            item.addProperty(e.getKey(), d[i]);
          } else {
            item.addProperty(e.getKey(), ((String[]) e.getValue())[i]);
          }
        }
        items.add(item);
      }
      JsonObject req = new JsonObject();
      req.add("user", new JsonObject());
      req.add("items", items);
      sb.append(gson.toJson(req)).append('\n');
    }
    Files.writeString(jsonl, sb);
    Process p = new ProcessBuilder(Daemon.binary("rankd-tool", "RANKD_TOOL_BIN").toString(), "score",
        Daemon.REPO.resolve(model).toString(), "--requests", jsonl.toString())
        .redirectError(ProcessBuilder.Redirect.INHERIT).start();
    String out = new String(p.getInputStream().readAllBytes(), StandardCharsets.UTF_8);
    assertEquals(0, p.waitFor());
    Files.delete(jsonl);
    List<JsonObject> res = new ArrayList<>();
    for (String line : out.split("\n")) {
      if (!line.isBlank()) {
        res.add(JsonParser.parseString(line).getAsJsonObject());
      }
    }
    return res;
  }

  @Test
  void multitaskHeadsEqualRankdTool() throws Exception {
    // The bundled multi-task Adult model reads no hours-per-week (it is a label there).
    List<Case> cases = new ArrayList<>();
    for (Case c : adultCases(5, 40)) {
      Map<String, Object> cols = new LinkedHashMap<>(c.columns());
      cols.remove("hours-per-week");
      cases.add(new Case(c.n(), cols));
    }
    List<JsonObject> want =
        referenceLines(cases, "examples/models/adult-multitask/1/model.rkm");
    try (Daemon d = new Daemon("127.0.0.1:0");
        RankdClient c = RankdClient.builder().address(d.addr).build()) {
      ScoreRequest r = new ScoreRequest("adult-multitask", 0);
      for (int k = 0; k < cases.size(); k++) {
        Scores s = c.score(request(r, cases.get(k), "adult-multitask"));
        assertEquals(List.of("income", "long_hours"), new ArrayList<>(s.heads().keySet()));
        assertScores(s.scores(), s.heads().get("income"));
        JsonObject heads = want.get(k).getAsJsonObject("heads");
        for (String name : s.heads().keySet()) {
          assertScores(floats(heads.getAsJsonArray(name)), s.heads().get(name));
        }
      }
      // A single-task model's answers carry no heads.
      assertEquals(0, c.score(request(r, cases.get(0))).heads().size());
    }
  }

  @Test
  void scoresEqualRankdTool() throws Exception {
    List<Case> cases = adultCases(10, 40);
    List<float[]> want = reference(cases);
    try (Daemon d = new Daemon("127.0.0.1:0");
        RankdClient c = RankdClient.builder().address(d.addr).connectionsPerAddress(2).build()) {
      c.ping();
      ScoreRequest r = new ScoreRequest("adult", 0);
      for (int k = 0; k < cases.size(); k++) {
        Scores s = c.score(request(r, cases.get(k)));
        assertEquals("adult", s.model());
        assertEquals(1, s.version());
        assertScores(want.get(k), s.scores());
      }
      // Pipelined: every call in flight at once, each gets its own answer.
      List<CompletableFuture<Scores>> fs = new ArrayList<>();
      for (int round = 0; round < 5; round++) {
        for (Case cs : cases) {
          fs.add(c.scoreAsync(request(new ScoreRequest("adult", 0), cs)));
        }
      }
      for (int i = 0; i < fs.size(); i++) {
        assertScores(want.get(i % cases.size()), fs.get(i).get().scores());
      }
    }
  }

  static void assertScores(float[] want, float[] got) {
    assertEquals(want.length, got.length);
    for (int i = 0; i < want.length; i++) {
      assertEquals(want[i], got[i], 1e-6, "item " + i);
    }
  }

  @Test
  void everyErrorCode() throws Exception {
    Path config = Files.createTempFile("rankd", ".toml");
    Files.writeString(config, "[limits]\nmax_items = 4\n");
    try (Daemon d = new Daemon("127.0.0.1:0", "--config", config.toString());
        RankdClient c = RankdClient.connect(d.addr)) {
      ScoreRequest r = new ScoreRequest("nope", 1).column("age", new double[] {39}, null);
      ServerException e = assertThrows(ServerException.class, () -> c.score(r));
      assertEquals(2, e.code());
      assertEquals("UnknownModel", e.codeName());
      assertTrue(e.serverMessage().contains("nope"), e.serverMessage());
      assertEquals("UnknownVersion", assertThrows(ServerException.class,
          () -> c.score(r.reset("adult", 1).column("age", new double[] {39}, null).version(9))).codeName());
      assertEquals("UnknownVersion", assertThrows(ServerException.class,
          () -> c.score(r.reset("adult", 1).label("canary"))).codeName());
      ServerException bad = assertThrows(ServerException.class,
          () -> c.score(r.reset("adult", 1).column("age", new String[] {"old"}, null)));
      assertEquals(4, bad.code());
      assertTrue(bad.serverMessage().contains("age"), bad.serverMessage());
      assertEquals("LimitExceeded", assertThrows(ServerException.class,
          () -> c.score(r.reset("adult", 5).column("age", new double[5], null))).codeName());
      Connection.Frame f = c.raw(Connection.SCORE_REQUEST, "garbage".getBytes(StandardCharsets.UTF_8));
      assertEquals(1, assertThrows(ServerException.class, () -> RankdClient.decode(f)).code());
      Connection.Frame g = c.raw(Connection.PONG, new byte[0]);
      assertEquals(7, assertThrows(ServerException.class, () -> RankdClient.decode(g)).code());
      // The connection is still good.
      assertEquals(1, c.score(r.reset("adult", 1).column("age", new double[] {39}, null)).scores().length);
    } finally {
      Files.delete(config);
    }
  }

  @Test
  void deadlineExceeded() throws Exception {
    try (Daemon d = new Daemon("127.0.0.1:0"); RankdClient c = RankdClient.connect(d.addr)) {
      double[] ages = new double[9000];
      ScoreRequest big = new ScoreRequest("adult", ages.length).column("age", ages, null);
      RankdException e = assertThrows(RankdException.class, () -> c.score(big, Duration.ofNanos(10_000)));
      assertTrue(e instanceof DeadlineExceededException
          || (e instanceof ServerException s && s.codeName().equals("DeadlineExceeded")), e.toString());
      assertEquals(1, c.score(new ScoreRequest("adult", 1).column("age", new double[] {3}, null)).scores().length);
    }
  }

  @Test
  void serverRestartMidLoad() throws Exception {
    int port;
    try (ServerSocket s = new ServerSocket(0)) {
      port = s.getLocalPort();
    }
    String listen = "127.0.0.1:" + port;
    ScoreRequest r = new ScoreRequest("adult", 1).column("age", new double[] {40}, null);
    try (RankdClient c = RankdClient.builder().address(listen).connectionsPerAddress(2)
        .backoff(Duration.ofMillis(20), Duration.ofMillis(200)).build()) {
      try (Daemon d = new Daemon(listen)) {
        assertEquals(1, c.score(r).scores().length);
      }
      // Down: every call fails fast with a clear exception.
      for (int i = 0; i < 5; i++) {
        long t = System.nanoTime();
        RankdException e = assertThrows(RankdException.class, () -> c.score(r));
        assertInstanceOf(ConnectionException.class, e);
        assertTrue(System.nanoTime() - t < 3_000_000_000L, "failed fast");
      }
      try (Daemon d = new Daemon(listen)) {
        long until = System.nanoTime() + 10_000_000_000L;
        while (true) {
          try {
            assertEquals(1, c.score(r).scores().length);
            break;
          } catch (ConnectionException e) {
            assertTrue(System.nanoTime() < until, "never reconnected");
            Thread.sleep(50);
          }
        }
      }
    }
  }

  @Test
  void scoresArePerItemAndArraysAreReused() throws Exception {
    List<Case> cases = adultCases(2, 5);
    try (Daemon d = new Daemon("127.0.0.1:0"); RankdClient c = RankdClient.connect(d.addr)) {
      ScoreRequest r = new ScoreRequest("adult", 0);
      float[] a = c.score(request(r, cases.get(0))).scores();
      float[] b = c.score(request(r, cases.get(1))).scores();
      float[] a2 = c.score(request(r, cases.get(0))).scores();
      assertArrayEquals(a, a2);
      assertEquals(5, b.length);
    }
  }
}
