package rankd.client;

import java.io.BufferedInputStream;
import java.io.DataInputStream;
import java.io.IOException;
import java.io.OutputStream;
import java.net.InetSocketAddress;
import java.net.Socket;
import java.nio.ByteBuffer;
import java.nio.ByteOrder;
import java.util.concurrent.CompletableFuture;
import java.util.concurrent.ConcurrentHashMap;
import java.util.concurrent.atomic.AtomicLong;

/**
 * One pipelined connection: any number of requests in flight, answers matched by request id in
 * whatever order they come, read by a reader thread of its own.
 */
final class Connection implements AutoCloseable {
  static final int HEADER_LEN = 20;
  static final byte SCORE_REQUEST = 1;
  static final byte SCORE_RESPONSE = 2;
  static final byte PING = 3;
  static final byte PONG = 4;
  static final byte ERROR = 7;

  /** A received frame. */
  record Frame(int type, long id, byte[] body) {}

  private final Socket socket;
  private final OutputStream out;
  private final byte[] header = new byte[HEADER_LEN];
  private final ConcurrentHashMap<Long, CompletableFuture<Frame>> pending =
      new ConcurrentHashMap<>();
  private final AtomicLong ids = new AtomicLong(1);
  private final Thread reader;
  private volatile RankdException broken;

  Connection(InetSocketAddress addr, int connectTimeoutMillis) throws IOException {
    socket = new Socket();
    socket.setTcpNoDelay(true);
    socket.connect(addr, connectTimeoutMillis);
    out = new java.io.BufferedOutputStream(socket.getOutputStream(), 64 * 1024);
    DataInputStream in = new DataInputStream(new BufferedInputStream(socket.getInputStream(), 64 * 1024));
    reader = new Thread(() -> read(in), "rankd-client-reader-" + addr);
    reader.setDaemon(true);
    reader.start();
  }

  boolean isBroken() {
    return broken != null;
  }

  int inFlight() {
    return pending.size();
  }

  private void read(DataInputStream in) {
    byte[] h = new byte[HEADER_LEN];
    try {
      while (true) {
        in.readFully(h);
        ByteBuffer hb = ByteBuffer.wrap(h).order(ByteOrder.LITTLE_ENDIAN);
        if (h[0] != 'R' || h[1] != 'K' || h[2] != 1 || hb.getShort(6) != 0) {
          throw new IOException("not a rankd frame header");
        }
        int type = h[3] & 0xff;
        long id = hb.getLong(8);
        int len = hb.getInt(16);
        if (len < 0) {
          throw new IOException("a frame of more than 2 GiB");
        }
        byte[] body = new byte[len];
        in.readFully(body);
        CompletableFuture<Frame> f = pending.remove(id);
        if (f != null) {
          f.complete(new Frame(type, id, body));
        }
      }
    } catch (IOException e) {
      fail(new ConnectionException("the connection to rankd was lost: " + e.getMessage(), e));
    }
  }

  private void fail(RankdException e) {
    if (broken == null) {
      broken = e;
    }
    try {
      socket.close();
    } catch (IOException ignored) {
      // Closing a failed socket: nothing more to do.
    }
    for (Long id : pending.keySet()) {
      CompletableFuture<Frame> f = pending.remove(id);
      if (f != null) {
        f.completeExceptionally(broken);
      }
    }
  }

  /** Sends a frame with {@code body} (its remaining bytes) and returns the future answer. */
  CompletableFuture<Frame> send(byte type, ByteBuffer body) {
    CompletableFuture<Frame> f = new CompletableFuture<>();
    RankdException b = broken;
    if (b != null) {
      f.completeExceptionally(b);
      return f;
    }
    long id = ids.getAndIncrement();
    pending.put(id, f);
    int len = body == null ? 0 : body.remaining();
    try {
      synchronized (this) {
        ByteBuffer hb = ByteBuffer.wrap(header).order(ByteOrder.LITTLE_ENDIAN);
        hb.put(0, (byte) 'R').put(1, (byte) 'K').put(2, (byte) 1).put(3, type);
        hb.putShort(4, (short) 0).putShort(6, (short) 0).putLong(8, id).putInt(16, len);
        out.write(header);
        if (len > 0) {
          out.write(body.array(), body.arrayOffset() + body.position(), len);
        }
        out.flush();
      }
    } catch (IOException e) {
      fail(new ConnectionException("cannot send to rankd: " + e.getMessage(), e));
    }
    return f;
  }

  /** Drops the wait for request {@code f} (a local deadline passed). */
  void forget(CompletableFuture<Frame> f) {
    pending.values().remove(f);
  }

  @Override
  public void close() {
    fail(new ConnectionException("the client was closed", null));
    try {
      reader.join(1000);
    } catch (InterruptedException e) {
      Thread.currentThread().interrupt();
    }
  }
}
