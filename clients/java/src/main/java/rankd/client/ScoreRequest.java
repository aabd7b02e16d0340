package rankd.client;

import com.google.flatbuffers.FlatBufferBuilder;
import java.nio.ByteBuffer;
import java.util.ArrayList;
import java.util.List;
import rankd.rpc.Feature;
import rankd.rpc.ItemColumn;
import rankd.rpc.Kind;

/**
 * A score request, built column by column as the protocol carries it (docs/protocol.md, "Score
 * requests"): request-level features once, item features as one array per feature. The arrays
 * are referenced, not copied, until the request is sent; {@link #reset} makes the object ready
 * for the next request, keeping its buffers, so a caller that reuses one request (and its own
 * value arrays) creates no per-item garbage.
 *
 * <p>Not thread-safe. Sending encodes the request at once: the object may be reset and reused as
 * soon as {@code score}/{@code scoreAsync} returns.
 */
public final class ScoreRequest {
  private final FlatBufferBuilder fbb = new FlatBufferBuilder(16 * 1024);
  private String model = "";
  private long version;
  private String label = "";
  private String routingKey = "";
  private long deadlineMicros;
  private int numItems;
  private final List<Object[]> user = new ArrayList<>();
  private final List<Object[]> columns = new ArrayList<>();

  /** A request for {@code model} with {@code numItems} items. */
  public ScoreRequest(String model, int numItems) {
    reset(model, numItems);
  }

  /** Forgets everything but the buffers: a new request for {@code model}. */
  public ScoreRequest reset(String model, int numItems) {
    if (numItems < 0) {
      throw new IllegalArgumentException("numItems < 0");
    }
    this.model = model;
    this.numItems = numItems;
    version = 0;
    label = "";
    routingKey = "";
    deadlineMicros = 0;
    user.clear();
    columns.clear();
    return this;
  }

  public String model() {
    return model;
  }

  public int numItems() {
    return numItems;
  }

  /** Exactly this version (0: not given). */
  public ScoreRequest version(long v) {
    version = v;
    return this;
  }

  /** The version this label points at. */
  public ScoreRequest label(String l) {
    label = l == null ? "" : l;
    return this;
  }

  /** The key the model's traffic split hashes (e.g. the user id). */
  public ScoreRequest routingKey(String k) {
    routingKey = k == null ? "" : k;
    return this;
  }

  /** A deadline relative to the server's receipt of the request (set by the client's calls). */
  ScoreRequest deadlineMicros(long us) {
    deadlineMicros = us;
    return this;
  }

  long deadlineMicros() {
    return deadlineMicros;
  }

  // Request-level features.

  public ScoreRequest user(String name, double value) {
    user.add(new Object[] {name, Kind.F64, value});
    return this;
  }

  public ScoreRequest user(String name, long value) {
    user.add(new Object[] {name, Kind.I64, value});
    return this;
  }

  public ScoreRequest user(String name, String value) {
    user.add(new Object[] {name, Kind.Str, value});
    return this;
  }

  public ScoreRequest user(String name, long[] values) {
    user.add(new Object[] {name, Kind.I64List, values});
    return this;
  }

  public ScoreRequest user(String name, String[] values) {
    user.add(new Object[] {name, Kind.StrList, values});
    return this;
  }

  // Item columns: one value per item; `missing` (may be null) marks items without the feature.

  public ScoreRequest column(String name, double[] values, boolean[] missing) {
    check(name, values.length, missing);
    columns.add(new Object[] {name, Kind.F64, values, null, missing});
    return this;
  }

  public ScoreRequest column(String name, long[] values, boolean[] missing) {
    check(name, values.length, missing);
    columns.add(new Object[] {name, Kind.I64, values, null, missing});
    return this;
  }

  public ScoreRequest column(String name, String[] values, boolean[] missing) {
    check(name, values.length, missing);
    columns.add(new Object[] {name, Kind.Str, values, null, missing});
    return this;
  }

  /** An int-list column: item i's values are {@code values[offsets[i]..offsets[i+1]]}. */
  public ScoreRequest listColumn(String name, long[] values, int[] offsets, boolean[] missing) {
    checkOffsets(name, values.length, offsets, missing);
    columns.add(new Object[] {name, Kind.I64List, values, offsets, missing});
    return this;
  }

  /** A string-list column: item i's values are {@code values[offsets[i]..offsets[i+1]]}. */
  public ScoreRequest listColumn(String name, String[] values, int[] offsets, boolean[] missing) {
    checkOffsets(name, values.length, offsets, missing);
    columns.add(new Object[] {name, Kind.StrList, values, offsets, missing});
    return this;
  }

  private void check(String name, int len, boolean[] missing) {
    if (len != numItems) {
      throw new IllegalArgumentException(
          "column `" + name + "` has " + len + " values for " + numItems + " items");
    }
    if (missing != null && missing.length != numItems) {
      throw new IllegalArgumentException("column `" + name + "`: missing has the wrong length");
    }
  }

  private void checkOffsets(String name, int len, int[] offsets, boolean[] missing) {
    if (offsets.length != numItems + 1 || offsets[0] != 0 || offsets[numItems] != len) {
      throw new IllegalArgumentException(
          "column `" + name + "`: offsets must have numItems + 1 entries from 0 to the values");
    }
    for (int i = 0; i < numItems; i++) {
      if (offsets[i + 1] < offsets[i]) {
        throw new IllegalArgumentException("column `" + name + "`: offsets decrease");
      }
    }
    if (missing != null && missing.length != numItems) {
      throw new IllegalArgumentException("column `" + name + "`: missing has the wrong length");
    }
  }

  /** The FlatBuffers body, valid until the next encode or reset. */
  ByteBuffer encode() {
    FlatBufferBuilder b = fbb;
    b.clear();
    int[] cols = new int[columns.size()];
    for (int c = 0; c < cols.length; c++) {
      cols[c] = column(b, columns.get(c));
    }
    int[] feats = new int[user.size()];
    for (int f = 0; f < feats.length; f++) {
      feats[f] = feature(b, user.get(f));
    }
    int itemsVec = rankd.rpc.ScoreRequest.createItemsVector(b, cols);
    int userVec = rankd.rpc.ScoreRequest.createUserVector(b, feats);
    int m = b.createString(model);
    int l = label.isEmpty() ? 0 : b.createString(label);
    int k = routingKey.isEmpty() ? 0 : b.createString(routingKey);
    int root =
        rankd.rpc.ScoreRequest.createScoreRequest(
            b, m, version, l, k, deadlineMicros, numItems, userVec, itemsVec);
    b.finish(root);
    return b.dataBuffer();
  }

  private static int feature(FlatBufferBuilder b, Object[] f) {
    int name = b.createString((String) f[0]);
    int kind = (Integer) f[1];
    int str = 0;
    int i64s = 0;
    int strs = 0;
    double f64 = 0;
    long i64 = 0;
    switch (kind) {
      case Kind.F64 -> f64 = (Double) f[2];
      case Kind.I64 -> i64 = (Long) f[2];
      case Kind.Str -> str = b.createString((String) f[2]);
      case Kind.I64List -> i64s = Feature.createI64sVector(b, (long[]) f[2]);
      case Kind.StrList -> strs = strings(b, (String[]) f[2], 0, ((String[]) f[2]).length);
      default -> throw new IllegalStateException("kind " + kind);
    }
    return Feature.createFeature(b, name, kind, f64, i64, str, i64s, strs);
  }

  private static int strings(FlatBufferBuilder b, String[] values, int from, int to) {
    int[] offs = new int[to - from];
    for (int i = from; i < to; i++) {
      offs[i - from] = b.createString(values[i] == null ? "" : values[i]);
    }
    b.startVector(4, offs.length, 4);
    for (int i = offs.length - 1; i >= 0; i--) {
      b.addOffset(offs[i]);
    }
    return b.endVector();
  }

  private int column(FlatBufferBuilder b, Object[] c) {
    int name = b.createString((String) c[0]);
    int kind = (Integer) c[1];
    int f64s = 0;
    int i64s = 0;
    int strs = 0;
    int offsets = 0;
    int missing = 0;
    switch (kind) {
      case Kind.F64 -> f64s = ItemColumn.createF64sVector(b, (double[]) c[2]);
      case Kind.I64, Kind.I64List -> i64s = ItemColumn.createI64sVector(b, (long[]) c[2]);
      case Kind.Str, Kind.StrList -> {
        String[] s = (String[]) c[2];
        strs = strings(b, s, 0, s.length);
      }
      default -> throw new IllegalStateException("kind " + kind);
    }
    if (c[3] != null) {
      int[] o = (int[]) c[3];
      b.startVector(4, o.length, 4);
      for (int i = o.length - 1; i >= 0; i--) {
        b.addInt(o[i]);
      }
      offsets = b.endVector();
    }
    boolean[] m = (boolean[]) c[4];
    if (m != null) {
      boolean any = false;
      for (boolean x : m) {
        any |= x;
      }
      if (any) {
        int bytes = (numItems + 7) / 8;
        b.startVector(1, bytes, 1);
        for (int i = bytes - 1; i >= 0; i--) {
          int v = 0;
          for (int j = 0; j < 8 && i * 8 + j < numItems; j++) {
            if (m[i * 8 + j]) {
              v |= 1 << j;
            }
          }
          b.addByte((byte) v);
        }
        missing = b.endVector();
      }
    }
    return ItemColumn.createItemColumn(b, name, kind, f64s, i64s, strs, offsets, missing);
  }
}
