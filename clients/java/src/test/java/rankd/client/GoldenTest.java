package rankd.client;

import static org.junit.jupiter.api.Assertions.assertArrayEquals;
import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertThrows;

import com.google.gson.JsonArray;
import com.google.gson.JsonElement;
import com.google.gson.JsonObject;
import com.google.gson.JsonParser;
import java.nio.ByteBuffer;
import java.nio.ByteOrder;
import java.nio.file.Files;
import java.nio.file.Path;
import java.util.ArrayList;
import java.util.LinkedHashSet;
import java.util.List;
import java.util.Map;
import java.util.Objects;
import java.util.Set;
import java.util.TreeMap;
import org.junit.jupiter.api.Test;
import rankd.rpc.Feature;
import rankd.rpc.ItemColumn;
import rankd.rpc.Kind;

/** clients/testdata/golden: requests decode like the reference client's; responses as documented. */
class GoldenTest {
  static final Path DIR = Daemon.REPO.resolve("clients/testdata/golden");

  static JsonObject cases() throws Exception {
    return JsonParser.parseString(Files.readString(DIR.resolve("cases.json"))).getAsJsonObject();
  }

  /** Every field of a ScoreRequest body, order-independent. */
  static Map<String, Object> decode(ByteBuffer body) {
    rankd.rpc.ScoreRequest r = rankd.rpc.ScoreRequest.getRootAsScoreRequest(body);
    Map<String, Object> out = new TreeMap<>();
    out.put("model", r.model());
    out.put("version", r.version());
    out.put("label", Objects.toString(r.label(), ""));
    out.put("routing_key", Objects.toString(r.routingKey(), ""));
    out.put("deadline_us", r.deadlineUs());
    long n = r.numItems();
    out.put("num_items", n);
    Map<String, Object> user = new TreeMap<>();
    for (int i = 0; i < r.userLength(); i++) {
      Feature f = r.user(i);
      Object v = switch (f.kind()) {
        case Kind.F64 -> f.f64();
        case Kind.I64 -> f.i64();
        case Kind.Str -> f.str();
        case Kind.I64List -> { List<Long> l = new ArrayList<>(); for (int j = 0; j < f.i64sLength(); j++) l.add(f.i64s(j)); yield l; }
        default -> { List<String> l = new ArrayList<>(); for (int j = 0; j < f.strsLength(); j++) l.add(f.strs(j)); yield l; }
      };
      user.put(f.name(), List.of(Kind.names[f.kind()], v));
    }
    out.put("user", user);
    Map<String, Object> cols = new TreeMap<>();
    for (int c = 0; c < r.itemsLength(); c++) {
      ItemColumn col = r.items(c);
      List<Object> vals = new ArrayList<>();
      for (int i = 0; i < n; i++) {
        boolean missing = col.missingLength() > 0 && ((col.missing(i / 8) >> (i % 8)) & 1) == 1;
        Object v;
        switch (col.kind()) {
          case Kind.F64 -> v = col.f64s(i);
          case Kind.I64 -> v = col.i64s(i);
          case Kind.Str -> v = col.strs(i);
          case Kind.I64List -> { List<Long> l = new ArrayList<>(); for (long j = col.offsets(i); j < col.offsets(i + 1); j++) l.add(col.i64s((int) j)); v = l; }
          default -> { List<String> l = new ArrayList<>(); for (long j = col.offsets(i); j < col.offsets(i + 1); j++) l.add(col.strs((int) j)); v = l; }
        }
        vals.add(missing ? "<missing>" : v);
      }
      cols.put(col.name(), List.of(Kind.names[col.kind()], vals));
    }
    out.put("items", cols);
    return out;
  }

  @Test
  void requestsMatchTheReferenceClient() throws Exception {
    for (JsonElement e : cases().getAsJsonArray("requests")) {
      JsonObject cs = e.getAsJsonObject();
      byte[] golden = Files.readAllBytes(DIR.resolve(cs.get("file").getAsString()));
      JsonArray items = cs.getAsJsonArray("items");
      int n = items.size();
      ScoreRequest r = new ScoreRequest(cs.get("model").getAsString(), n)
          .version(cs.get("version").getAsLong()).label(cs.get("label").getAsString())
          .routingKey(cs.get("routing_key").getAsString()).deadlineMicros(cs.get("deadline_us").getAsLong());
      for (JsonElement u : cs.getAsJsonArray("user")) {
        JsonObject f = u.getAsJsonObject();
        String name = f.get("name").getAsString();
        JsonObject v = f.getAsJsonObject("value");
        JsonElement x = v.get("value");
        switch (v.get("kind").getAsString()) {
          case "F64" -> r.user(name, x.getAsDouble());
          case "I64" -> r.user(name, x.getAsLong());
          case "Str" -> r.user(name, x.getAsString());
          case "I64List" -> r.user(name, longs(x.getAsJsonArray()));
          default -> r.user(name, strings(x.getAsJsonArray()));
        }
      }
      // Columns in order of first appearance, missing where an item lacks the feature.
      Set<String> names = new LinkedHashSet<>();
      Map<String, String> kinds = new TreeMap<>();
      for (JsonElement row : items) {
        for (JsonElement f : row.getAsJsonArray()) {
          names.add(f.getAsJsonObject().get("name").getAsString());
          kinds.put(f.getAsJsonObject().get("name").getAsString(), f.getAsJsonObject().getAsJsonObject("value").get("kind").getAsString());
        }
      }
      for (String name : names) {
        boolean[] missing = new boolean[n];
        JsonElement[] vals = new JsonElement[n];
        for (int i = 0; i < n; i++) {
          missing[i] = true;
          for (JsonElement f : items.get(i).getAsJsonArray()) {
            if (f.getAsJsonObject().get("name").getAsString().equals(name)) {
              missing[i] = false;
              vals[i] = f.getAsJsonObject().getAsJsonObject("value").get("value");
            }
          }
        }
        switch (kinds.get(name)) {
          case "F64" -> { double[] d = new double[n]; for (int i = 0; i < n; i++) d[i] = missing[i] ? 0 : vals[i].getAsDouble(); r.column(name, d, missing); }
          case "I64" -> { long[] d = new long[n]; for (int i = 0; i < n; i++) d[i] = missing[i] ? 0 : vals[i].getAsLong(); r.column(name, d, missing); }
          case "Str" -> { String[] d = new String[n]; for (int i = 0; i < n; i++) d[i] = missing[i] ? "" : vals[i].getAsString(); r.column(name, d, missing); }
          case "I64List" -> {
            List<Long> flat = new ArrayList<>(); int[] offs = new int[n + 1];
            for (int i = 0; i < n; i++) { if (!missing[i]) for (JsonElement x : vals[i].getAsJsonArray()) flat.add(x.getAsLong()); offs[i + 1] = flat.size(); }
            r.listColumn(name, flat.stream().mapToLong(Long::longValue).toArray(), offs, missing);
          }
          default -> {
            List<String> flat = new ArrayList<>(); int[] offs = new int[n + 1];
            for (int i = 0; i < n; i++) { if (!missing[i]) for (JsonElement x : vals[i].getAsJsonArray()) flat.add(x.getAsString()); offs[i + 1] = flat.size(); }
            r.listColumn(name, flat.toArray(new String[0]), offs, missing);
          }
        }
      }
      ByteBuffer ours = r.encode();
      ByteBuffer gh = ByteBuffer.wrap(golden).order(ByteOrder.LITTLE_ENDIAN);
      assertEquals('R', golden[0]);
      assertEquals(cs.get("id").getAsLong(), gh.getLong(8));
      assertEquals(golden.length - 20, gh.getInt(16));
      ByteBuffer goldenBody = ByteBuffer.wrap(golden, 20, golden.length - 20).slice();
      assertEquals(decode(goldenBody), decode(ours), cs.get("name").getAsString());
    }
  }

  static long[] longs(JsonArray a) {
    long[] out = new long[a.size()];
    for (int i = 0; i < out.length; i++) out[i] = a.get(i).getAsLong();
    return out;
  }

  static String[] strings(JsonArray a) {
    String[] out = new String[a.size()];
    for (int i = 0; i < out.length; i++) out[i] = a.get(i).getAsString();
    return out;
  }

  @Test
  void responsesDecodeAsDocumented() throws Exception {
    for (JsonElement e : cases().getAsJsonArray("responses")) {
      JsonObject cs = e.getAsJsonObject();
      byte[] data = Files.readAllBytes(DIR.resolve(cs.get("file").getAsString()));
      ByteBuffer h = ByteBuffer.wrap(data).order(ByteOrder.LITTLE_ENDIAN);
      int type = data[3];
      long id = h.getLong(8);
      int len = h.getInt(16);
      assertEquals(cs.get("type").getAsInt(), type);
      assertEquals(cs.get("id").getAsLong(), id);
      assertEquals(data.length - 20, len);
      byte[] body = java.util.Arrays.copyOfRange(data, 20, data.length);
      Connection.Frame f = new Connection.Frame(type, id, body);
      if (type == Connection.SCORE_RESPONSE) {
        Scores s = RankdClient.decode(f);
        assertEquals(cs.get("model").getAsString(), s.model());
        assertEquals(cs.get("version").getAsLong(), s.version());
        JsonArray a = cs.getAsJsonArray("scores");
        float[] want = new float[a.size()];
        for (int i = 0; i < want.length; i++) want[i] = a.get(i).getAsFloat();
        assertArrayEquals(want, s.scores());
        java.util.List<String> names = new java.util.ArrayList<>();
        if (cs.has("heads")) {
          for (JsonElement he : cs.getAsJsonArray("heads")) {
            JsonArray pair = he.getAsJsonArray();
            String name = pair.get(0).getAsString();
            names.add(name);
            JsonArray v = pair.get(1).getAsJsonArray();
            float[] hw = new float[v.size()];
            for (int i = 0; i < hw.length; i++) hw[i] = v.get(i).getAsFloat();
            assertArrayEquals(hw, s.heads().get(name), name);
          }
        }
        assertEquals(names, new java.util.ArrayList<>(s.heads().keySet()));
      } else if (type == Connection.ERROR) {
        ServerException se = assertThrows(ServerException.class, () -> RankdClient.decode(f));
        assertEquals(cs.get("code").getAsInt(), se.code());
        assertEquals(cs.get("message").getAsString(), se.serverMessage());
        String name = cs.has("code_name") ? cs.get("code_name").getAsString() : "code " + se.code();
        assertEquals(name, se.codeName());
      } else {
        assertEquals(Connection.PONG, type);
      }
    }
  }
}
