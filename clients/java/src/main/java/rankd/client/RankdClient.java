package rankd.client;

import java.io.IOException;
import java.net.InetSocketAddress;
import java.nio.ByteBuffer;
import java.time.Duration;
import java.util.ArrayList;
import java.util.List;
import java.util.concurrent.CompletableFuture;
import java.util.concurrent.CompletionException;
import java.util.concurrent.ExecutionException;
import java.util.concurrent.TimeUnit;
import java.util.concurrent.TimeoutException;
import java.util.concurrent.atomic.AtomicInteger;
import rankd.rpc.ErrorResponse;
import rankd.rpc.ScoreResponse;

/**
 * A client of rankd's binary RPC (docs/protocol.md) for the JVM.
 *
 * <ul>
 *   <li>A pool of pipelined connections to one or more addresses; calls go round robin over
 *       the connections that work, so load spreads over the servers.
 *   <li>{@link #scoreAsync} returns a {@code CompletableFuture}; {@link #score} blocks.
 *   <li>A per-call deadline is sent to the server (it answers DeadlineExceeded instead of
 *       scoring late) and enforced here ({@link DeadlineExceededException}).
 *   <li>A connection that fails fails its calls at once with {@link ConnectionException}; it is
 *       reopened on a later call, after a backoff that doubles up to {@code maxBackoff} while the
 *       server stays unreachable.
 *   <li>Server errors are {@link ServerException}s with the code and message.
 * </ul>
 *
 * <p>Thread-safe. Close it to close the connections.
 */
public final class RankdClient implements AutoCloseable {
  private final List<Slot> slots = new ArrayList<>();
  private final AtomicInteger next = new AtomicInteger();
  private final Duration defaultDeadline;
  private final int connectTimeoutMillis;
  private final Duration minBackoff;
  private final Duration maxBackoff;
  private volatile boolean closed;

  private static final class Slot {
    final InetSocketAddress addr;
    Connection conn;
    long retryAtNanos;
    Duration backoff;

    Slot(InetSocketAddress addr, Duration backoff) {
      this.addr = addr;
      this.backoff = backoff;
    }
  }

  private RankdClient(Builder b) {
    defaultDeadline = b.defaultDeadline;
    connectTimeoutMillis = (int) b.connectTimeout.toMillis();
    minBackoff = b.minBackoff;
    maxBackoff = b.maxBackoff;
    for (InetSocketAddress a : b.addresses) {
      for (int i = 0; i < b.connectionsPerAddress; i++) {
        slots.add(new Slot(a, minBackoff));
      }
    }
    if (slots.isEmpty()) {
      throw new IllegalArgumentException("no address");
    }
  }

  /** A builder. */
  public static Builder builder() {
    return new Builder();
  }

  /** A client of one server with the defaults. */
  public static RankdClient connect(String hostPort) {
    return builder().address(hostPort).build();
  }

  /** Client settings. */
  public static final class Builder {
    private final List<InetSocketAddress> addresses = new ArrayList<>();
    private int connectionsPerAddress = 2;
    private Duration defaultDeadline = Duration.ofSeconds(10);
    private Duration connectTimeout = Duration.ofSeconds(2);
    private Duration minBackoff = Duration.ofMillis(50);
    private Duration maxBackoff = Duration.ofSeconds(5);

    /** A server, "host:port". */
    public Builder address(String hostPort) {
      int i = hostPort.lastIndexOf(':');
      return address(new InetSocketAddress(hostPort.substring(0, i), Integer.parseInt(hostPort.substring(i + 1))));
    }

    public Builder address(InetSocketAddress a) {
      addresses.add(a);
      return this;
    }

    /** Connections to each address (default 2). */
    public Builder connectionsPerAddress(int n) {
      connectionsPerAddress = Math.max(1, n);
      return this;
    }

    /** The deadline of calls that give none (default 10 s). */
    public Builder defaultDeadline(Duration d) {
      defaultDeadline = d;
      return this;
    }

    public Builder connectTimeout(Duration d) {
      connectTimeout = d;
      return this;
    }

    /** Reconnect backoff: first wait and cap (defaults 50 ms, 5 s). */
    public Builder backoff(Duration min, Duration max) {
      minBackoff = min;
      maxBackoff = max;
      return this;
    }

    public RankdClient build() {
      return new RankdClient(this);
    }
  }

  /** A working connection, round robin; fails fast when none can be had. */
  private Connection connection() {
    if (closed) {
      throw new ConnectionException("the client is closed", null);
    }
    RankdException last = null;
    int n = slots.size();
    int start = Math.floorMod(next.getAndIncrement(), n);
    for (int k = 0; k < n; k++) {
      Slot s = slots.get((start + k) % n);
      synchronized (s) {
        if (s.conn != null && !s.conn.isBroken()) {
          return s.conn;
        }
        long now = System.nanoTime();
        if (s.conn != null || now - s.retryAtNanos >= 0) {
          if (s.conn != null) {
            s.conn = null;
            s.retryAtNanos = now; // just broke: try once at once
          }
          try {
            s.conn = new Connection(s.addr, connectTimeoutMillis);
            s.backoff = minBackoff;
            return s.conn;
          } catch (IOException e) {
            s.retryAtNanos = now + s.backoff.toNanos();
            s.backoff = s.backoff.multipliedBy(2).compareTo(maxBackoff) > 0 ? maxBackoff : s.backoff.multipliedBy(2);
            last = new ConnectionException("cannot connect to " + s.addr + ": " + e.getMessage(), e);
          }
        }
      }
    }
    throw last != null ? last : new ConnectionException("no server is reachable (reconnecting after backoff)", null);
  }

  /** Scores {@code req} with the default deadline. */
  public CompletableFuture<Scores> scoreAsync(ScoreRequest req) {
    return scoreAsync(req, defaultDeadline);
  }

  /**
   * Scores {@code req}: the future completes with the scores, or exceptionally with a {@link
   * ServerException}, {@link DeadlineExceededException} or {@link ConnectionException}.
   */
  public CompletableFuture<Scores> scoreAsync(ScoreRequest req, Duration deadline) {
    Connection c;
    try {
      c = connection();
    } catch (RankdException e) {
      return CompletableFuture.failedFuture(e);
    }
    long us = Math.max(1, deadline.toNanos() / 1000);
    ByteBuffer body = req.deadlineMicros(us).encode();
    CompletableFuture<Connection.Frame> f = c.send(Connection.SCORE_REQUEST, body);
    return f.orTimeout(deadline.toNanos(), TimeUnit.NANOSECONDS)
        .handle(
            (frame, err) -> {
              if (err != null) {
                Throwable e = err instanceof CompletionException ? err.getCause() : err;
                if (e instanceof TimeoutException) {
                  c.forget(f);
                  throw new DeadlineExceededException("no answer within " + deadline);
                }
                throw e instanceof RankdException r ? r : new ConnectionException(e.toString(), e);
              }
              return decode(frame);
            });
  }

  /** Scores {@code req} and waits, with the default deadline. */
  public Scores score(ScoreRequest req) {
    return score(req, defaultDeadline);
  }

  /** Scores {@code req} and waits: throws the exceptions {@link #scoreAsync} completes with. */
  public Scores score(ScoreRequest req, Duration deadline) {
    try {
      return scoreAsync(req, deadline).get();
    } catch (ExecutionException e) {
      throw unwrap(e.getCause());
    } catch (InterruptedException e) {
      Thread.currentThread().interrupt();
      throw new RankdException("interrupted", e);
    }
  }

  /** A ping round trip. */
  public void ping() {
    try {
      Connection.Frame f = connection().send(Connection.PING, null).get(defaultDeadline.toMillis(), TimeUnit.MILLISECONDS);
      if (f.type() != Connection.PONG) {
        throw new RankdException("ping answered with message type " + f.type());
      }
    } catch (ExecutionException e) {
      throw unwrap(e.getCause());
    } catch (TimeoutException e) {
      throw new DeadlineExceededException("no pong within " + defaultDeadline);
    } catch (InterruptedException e) {
      Thread.currentThread().interrupt();
      throw new RankdException("interrupted", e);
    }
  }

  /** Sends a raw frame and returns (type, body) of its answer: for tests of the protocol. */
  Connection.Frame raw(byte type, byte[] body) throws Exception {
    return connection().send(type, ByteBuffer.wrap(body)).get(defaultDeadline.toMillis(), TimeUnit.MILLISECONDS);
  }

  private static RankdException unwrap(Throwable t) {
    if (t instanceof CompletionException && t.getCause() != null) {
      t = t.getCause();
    }
    return t instanceof RankdException r ? r : new RankdException(t.toString(), t);
  }

  /** {@code n} little-endian floats from {@code raw} (absent: zeros). */
  private static float[] floats(int n, ByteBuffer raw) {
    float[] out = new float[n];
    if (raw != null) {
      raw.order(java.nio.ByteOrder.LITTLE_ENDIAN).asFloatBuffer().get(out);
    }
    return out;
  }

  static Scores decode(Connection.Frame frame) {
    ByteBuffer bb = ByteBuffer.wrap(frame.body());
    switch (frame.type()) {
      case Connection.SCORE_RESPONSE -> {
        ScoreResponse r = ScoreResponse.getRootAsScoreResponse(bb);
        float[] scores = floats(r.scoresLength(), r.scoresAsByteBuffer());
        java.util.Map<String, float[]> heads = new java.util.LinkedHashMap<>();
        if (r.head() != null) {
          heads.put(r.head(), scores);
          for (int i = 0; i < r.headsLength(); i++) {
            rankd.rpc.HeadScores h = r.heads(i);
            heads.put(h.name(), floats(h.scoresLength(), h.scoresAsByteBuffer()));
          }
        }
        return new Scores(
            r.model() == null ? "" : r.model(),
            r.version(),
            scores,
            java.util.Collections.unmodifiableMap(heads));
      }
      case Connection.ERROR -> {
        ErrorResponse e = ErrorResponse.getRootAsErrorResponse(bb);
        throw new ServerException(e.code(), e.message() == null ? "" : e.message());
      }
      default -> throw new RankdException("unexpected message type " + frame.type());
    }
  }

  @Override
  public void close() {
    closed = true;
    for (Slot s : slots) {
      synchronized (s) {
        if (s.conn != null) {
          s.conn.close();
          s.conn = null;
        }
      }
    }
  }
}
