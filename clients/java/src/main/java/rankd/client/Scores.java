package rankd.client;

/** A scored request: the model, the version that served it, one score per item. */
public record Scores(String model, long version, float[] scores) {}
