#!/usr/bin/env bash
# A real single-broker Apache Kafka for tests and CI: the broker from kafka_2.13 on Maven Central
# in KRaft mode (broker and controller in one JVM, no ZooKeeper). Nothing is compiled.
#
#   scripts/kafka.sh start [DIR] [--port N] [--owner PID]   start; prints kafka://127.0.0.1:PORT
#   scripts/kafka.sh stop [DIR]                             stop and delete its data
#   scripts/kafka.sh url [DIR]                              the running broker's URL
#   scripts/kafka.sh classpath                              resolve the jars (Maven), print the path
#
# DIR defaults to $RANKD_KAFKA_DIR or /tmp/rankd-kafka. --port 0 (the default) picks a free port
# for the broker (the controller takes another). --owner PID stops the broker when that process
# exits (tests start their own this way). Needs Java 17+ and Maven; the first start downloads
# ~45 MB of jars into ~/.m2. A start that fails is retried once (about one cold start in 35
# exits silently); the log of the attempt is kept in DIR/log.txt.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
cmd="${1:-}"
shift || true
dir="${RANKD_KAFKA_DIR:-/tmp/rankd-kafka}"
if [ $# -gt 0 ] && [ "${1#-}" = "$1" ]; then
  dir="$1"
  shift
fi
port=0
owner=""
while [ $# -gt 0 ]; do
  case "$1" in
    --port) port="$2"; shift 2 ;;
    --owner) owner="$2"; shift 2 ;;
    *) break ;;
  esac
done
java_opts=(-XX:TieredStopAtLevel=1 -XX:+UseSerialGC -Xss512k -Xmx512m -Dorg.slf4j.simpleLogger.defaultLogLevel=warn -Dorg.slf4j.simpleLogger.log.kafka.server.KafkaRaftServer=info)

need() {
  for tool in java mvn; do
    command -v "$tool" >/dev/null || { echo "kafka.sh: $tool is not installed" >&2; exit 3; }
  done
}

classpath() {
  local cp_file="$HOME/.cache/rankd/kafka-classpath-4.4.0-1.txt"
  if [ ! -s "$cp_file" ] || ! tr ':' '\n' <"$cp_file" | while read -r jar; do [ -f "$jar" ] || exit 1; done; then
    mkdir -p "$(dirname "$cp_file")"
    mvn -B -q -Dstyle.color=never -f "$here/kafka/pom.xml" dependency:build-classpath -Dmdep.outputFile="$cp_file" >&2
  fi
  cat "$cp_file"
}

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

running() {
  [ -f "$dir/pid" ] && kill -0 "$(cat "$dir/pid")" 2>/dev/null
}

listening() {
  (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

# One attempt: format the storage, start the JVM, wait until the broker answers on its port.
attempt() {
  local cp="$1" broker="$2" controller="$3"
  rm -rf "$dir/data" "$dir/url"
  mkdir -p "$dir/data/logs" "$dir/data/tmp"
  cat >"$dir/server.properties" <<PROPS
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@127.0.0.1:$controller
listeners=PLAINTEXT://127.0.0.1:$broker,CONTROLLER://127.0.0.1:$controller
advertised.listeners=PLAINTEXT://127.0.0.1:$broker
controller.listener.names=CONTROLLER
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT
inter.broker.listener.name=PLAINTEXT
log.dirs=$dir/data/logs
num.partitions=1
offsets.topic.replication.factor=1
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
group.initial.rebalance.delay.ms=0
broker.heartbeat.interval.ms=500
broker.session.timeout.ms=2000
auto.create.topics.enable=true
message.max.bytes=16777216
replica.fetch.max.bytes=16777216
PROPS
  java "${java_opts[@]}" -Djava.io.tmpdir="$dir/data/tmp" -cp "$cp" kafka.tools.StorageTool \
    format -t "$(python3 -c 'import base64,uuid; print(base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("="))')" \
    -c "$dir/server.properties" >"$dir/log.txt" 2>&1 || return 1
  # setsid: the broker outlives the shell that started it (tests, .ci/run).
  setsid java "${java_opts[@]}" -Djava.io.tmpdir="$dir/data/tmp" -cp "$cp" kafka.Kafka \
    "$dir/server.properties" >>"$dir/log.txt" 2>&1 </dev/null &
  echo $! >"$dir/pid"
  for _ in $(seq 1 120); do
    if ! running; then
      return 1
    fi
    if listening "$broker" && grep -q "Kafka Server started" "$dir/log.txt"; then
      return 0
    fi
    sleep 0.5
  done
  return 1
}

stop_jvm() {
  if [ -f "$dir/pid" ]; then
    local pid
    pid="$(cat "$dir/pid")"
    kill -CONT "$pid" 2>/dev/null || true
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 1 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
    kill -9 "$pid" 2>/dev/null || true
    rm -f "$dir/pid"
  fi
}

case "$cmd" in
  classpath)
    need
    classpath
    ;;
  start)
    need
    if running; then
      echo "kafka.sh: a broker already runs from $dir (pid $(cat "$dir/pid"))" >&2
      exit 1
    fi
    if [ "$port" != 0 ] && listening "$port"; then
      echo "kafka.sh: port $port is in use (a stale broker?); stop it first" >&2
      exit 1
    fi
    cp="$(classpath)"
    mkdir -p "$dir"
    ok=""
    for try in 1 2; do
      broker="$port"
      [ "$broker" = 0 ] && broker="$(free_port)"
      controller="$(free_port)"
      if attempt "$cp" "$broker" "$controller"; then
        ok=1
        break
      fi
      echo "kafka.sh: start attempt $try failed; log:" >&2
      tail -20 "$dir/log.txt" >&2
      cp "$dir/log.txt" "$dir/log-attempt-$try.txt" 2>/dev/null || true
      stop_jvm
    done
    [ -n "$ok" ] || exit 1
    url="kafka://127.0.0.1:$broker"
    echo "$url" >"$dir/url"
    if [ -n "$owner" ]; then
      pid="$(cat "$dir/pid")"
      setsid bash -c "while kill -0 $owner 2>/dev/null && kill -0 $pid 2>/dev/null; do sleep 1; done; kill $pid 2>/dev/null; sleep 3; kill -9 $pid 2>/dev/null" \
        >/dev/null 2>&1 </dev/null &
    fi
    echo "$url"
    ;;
  stop)
    stop_jvm
    rm -rf "$dir/data" "$dir/url"
    ;;
  url)
    running && cat "$dir/url"
    ;;
  *)
    sed -n '2,14p' "$0" >&2
    exit 2
    ;;
esac
