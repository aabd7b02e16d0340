package rankd.client;

import java.util.Map;

/**
 * A scored request: the model, the version that served it, one score per item (a multi-task
 * model: its default head's), and a multi-task model's heads by name in the model's head order,
 * the default head first (empty for a single-task model).
 */
public record Scores(String model, long version, float[] scores, Map<String, float[]> heads) {
  /** A single-task model's scores. */
  public Scores(String model, long version, float[] scores) {
    this(model, version, scores, Map.of());
  }
}
