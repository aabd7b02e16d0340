package rankd.client;

import java.io.BufferedReader;
import java.io.InputStreamReader;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.util.ArrayList;
import java.util.List;
import org.junit.jupiter.api.Assumptions;

/** The real rankd binary, started for a test: RANKD_BIN, else target/debug/rankd. */
final class Daemon implements AutoCloseable {
  static final Path REPO = Path.of(System.getProperty("user.dir")).resolve("../..").normalize();

  final Process process;
  final String addr;

  static Path binary(String name, String env) {
    String p = System.getenv(env);
    Path path = p != null ? Path.of(p) : REPO.resolve("target/debug/" + name);
    if (!Files.exists(path)) {
      String why = "no " + name + " at " + path + " (cargo build --bin " + name + ", or set " + env + ")";
      if (System.getenv("CI") != null) {
        throw new IllegalStateException(why);
      }
      Assumptions.abort(why);
    }
    return path;
  }

  Daemon(String listen, String... extra) throws Exception {
    List<String> cmd = new ArrayList<>(List.of(binary("rankd", "RANKD_BIN").toString(),
        "--models", REPO.resolve("examples/models").toString(), "--listen", listen,
        "--admin", "127.0.0.1:0", "--threads", "1"));
    cmd.addAll(List.of(extra));
    process = new ProcessBuilder(cmd).redirectOutput(ProcessBuilder.Redirect.DISCARD).start();
    BufferedReader err = new BufferedReader(new InputStreamReader(process.getErrorStream(), StandardCharsets.UTF_8));
    StringBuilder log = new StringBuilder();
    String line;
    String found = null;
    while ((line = err.readLine()) != null) {
      log.append(line).append('\n');
      if (line.startsWith("rankd: serving on ")) {
        found = line.split(" ")[3];
        break;
      }
    }
    if (found == null) {
      throw new IllegalStateException("rankd exited before serving:\n" + log);
    }
    addr = found;
    Thread drain = new Thread(() -> {
      try {
        while (err.readLine() != null) {
          // keep the pipe from filling
        }
      } catch (Exception ignored) {
        // the daemon stopped
      }
    });
    drain.setDaemon(true);
    drain.start();
  }

  @Override
  public void close() throws Exception {
    process.destroyForcibly();
    process.waitFor();
  }
}
