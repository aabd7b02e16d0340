package rankd.client;

import java.util.ArrayList;
import java.util.Arrays;
import java.util.List;
import java.util.concurrent.CompletableFuture;
import java.util.concurrent.Semaphore;
import java.util.concurrent.atomic.AtomicLong;

/**
 * The Java client's side of the client benchmark (clients/java/bench.sh): WINDOW requests in
 * flight over CONNECTIONS connections for SECONDS, Adult requests of 40 rows; prints
 * "java requests_per_s R p50_us A p99_us B".
 */
public final class ClientBench {
  public static void main(String[] args) throws Exception {
    String addr = args[0];
    double seconds = Double.parseDouble(args[1]);
    int window = Integer.parseInt(args[2]);
    int conns = Integer.parseInt(args[3]);
    List<RankdClientTest.Case> cases = RankdClientTest.adultCases(20, 40);
    try (RankdClient c = RankdClient.builder().address(addr).connectionsPerAddress(conns).build()) {
      // Warm-up, then the measured run.
      run(c, cases, window, 1.0);
      long[] lat = run(c, cases, window, seconds);
      Arrays.sort(lat);
      System.out.printf("java requests_per_s %.0f p50_us %d p99_us %d%n",
          lat.length / seconds, lat[lat.length / 2] / 1000, lat[(int) (lat.length * 0.99)] / 1000);
    }
  }

  static long[] run(RankdClient c, List<RankdClientTest.Case> cases, int window, double seconds)
      throws Exception {
    Semaphore slots = new Semaphore(window);
    AtomicLong errors = new AtomicLong();
    long end = System.nanoTime() + (long) (seconds * 1e9);
    ScoreRequest[] reqs = new ScoreRequest[cases.size()];
    for (int i = 0; i < reqs.length; i++) {
      reqs[i] = RankdClientTest.request(new ScoreRequest("adult", 0), cases.get(i));
    }
    List<Long> latencies = java.util.Collections.synchronizedList(new ArrayList<>());
    int k = 0;
    while (System.nanoTime() < end) {
      slots.acquire();
      long t0 = System.nanoTime();
      // Encoded at once: the request object is reusable when scoreAsync returns.
      CompletableFuture<Scores> f = c.scoreAsync(reqs[k++ % reqs.length]);
      f.whenComplete((s, e) -> {
        if (e != null) {
          errors.incrementAndGet();
        } else {
          latencies.add(System.nanoTime() - t0);
        }
        slots.release();
      });
    }
    slots.acquire(window);
    if (errors.get() > 0) {
      throw new IllegalStateException(errors.get() + " errors");
    }
    return latencies.stream().mapToLong(Long::longValue).toArray();
  }
}
