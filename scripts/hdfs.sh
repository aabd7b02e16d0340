#!/usr/bin/env bash
# A real single-node HDFS for tests and CI: Hadoop's own MiniDFSClusterManager (NameNode and one
# DataNode in one JVM) from hadoop-client-minicluster on Maven Central. Nothing is compiled.
#
#   scripts/hdfs.sh start [DIR] [--port N] [--owner PID]   start; prints hdfs://127.0.0.1:PORT
#   scripts/hdfs.sh stop [DIR]                             stop and delete its data
#   scripts/hdfs.sh url [DIR]                              the running cluster's URL
#   scripts/hdfs.sh fs [DIR] -- ARGS...                    Hadoop's FsShell (-put, -get, -ls, ...)
#   scripts/hdfs.sh classpath                              resolve the jars (Maven), print the path
#
# DIR defaults to $RANKD_HDFS_DIR or /tmp/rankd-hdfs. --port 0 (the default) picks a free port;
# a given port must be free (a stale cluster on it would serve a deleted data directory).
# --owner PID stops the cluster when that process exits (tests start their own this way).
# Needs Java 17+ and Maven; the first start downloads ~120 MB of jars into ~/.m2.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
cmd="${1:-}"
shift || true
dir="${RANKD_HDFS_DIR:-/tmp/rankd-hdfs}"
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
    --) shift; break ;;
    *) break ;;
  esac
done
java_opts=(-XX:TieredStopAtLevel=1 -XX:+UseSerialGC -Xss512k)

need() {
  for tool in java mvn; do
    command -v "$tool" >/dev/null || { echo "hdfs.sh: $tool is not installed" >&2; exit 3; }
  done
}

classpath() {
  local cp_file="$HOME/.cache/rankd/hdfs-classpath-3.5.0.txt"
  if [ ! -s "$cp_file" ] || ! tr ':' '\n' <"$cp_file" | while read -r jar; do [ -f "$jar" ] || exit 1; done; then
    mkdir -p "$(dirname "$cp_file")"
    mvn -B -q -Dstyle.color=never -f "$here/hdfs/pom.xml" dependency:build-classpath -Dmdep.outputFile="$cp_file" >&2
  fi
  cat "$cp_file"
}

write_conf() {
  local url="$1"
  mkdir -p "$dir/conf"
  cat >"$dir/conf/core-site.xml" <<EOF
<?xml version="1.0"?>
<configuration>
  <property><name>fs.defaultFS</name><value>$url</value></property>
</configuration>
EOF
  # Client settings (FsShell) belong in hdfs-site.xml.
  cat >"$dir/conf/hdfs-site.xml" <<EOF
<?xml version="1.0"?>
<configuration>
  <property><name>dfs.replication</name><value>1</value></property>
</configuration>
EOF
}

running() {
  [ -f "$dir/pid" ] && kill -0 "$(cat "$dir/pid")" 2>/dev/null
}

case "$cmd" in
  classpath)
    need
    classpath
    ;;
  start)
    need
    if running; then
      echo "hdfs.sh: a cluster already runs from $dir (pid $(cat "$dir/pid"))" >&2
      exit 1
    fi
    if [ "$port" != 0 ] && (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
      echo "hdfs.sh: port $port is in use (a stale cluster?); stop it first" >&2
      exit 1
    fi
    cp="$(classpath)"
    rm -rf "$dir/data" "$dir/details.json" "$dir/url"
    mkdir -p "$dir/data/tmp"
    # setsid: the cluster outlives the shell that started it (tests, .ci/run).
    setsid java "${java_opts[@]}" -Djava.io.tmpdir="$dir/data/tmp" -cp "$cp" \
      org.apache.hadoop.test.MiniDFSClusterManager -format -nnport "$port" -datanodes 1 \
      -writeDetails "$dir/details.json" \
      -D "hdfs.minidfs.basedir=$dir/data" -D dfs.replication=1 \
      -D dfs.namenode.fs-limits.min-block-size=4096 \
      >"$dir/log.txt" 2>&1 </dev/null &
    echo $! >"$dir/pid"
    for _ in $(seq 1 120); do
      if [ -s "$dir/details.json" ]; then
        break
      fi
      if ! running; then
        echo "hdfs.sh: the cluster exited; log:" >&2
        tail -20 "$dir/log.txt" >&2
        exit 1
      fi
      sleep 0.5
    done
    got="$(sed -n 's/.*"namenode_port":\([0-9]*\).*/\1/p' "$dir/details.json")"
    if [ -z "$got" ]; then
      echo "hdfs.sh: no NameNode port after 60 s; log:" >&2
      tail -20 "$dir/log.txt" >&2
      kill "$(cat "$dir/pid")" 2>/dev/null || true
      exit 1
    fi
    url="hdfs://127.0.0.1:$got"
    write_conf "$url"
    echo "$url" >"$dir/url"
    if [ -n "$owner" ]; then
      pid="$(cat "$dir/pid")"
      # Only the JVM is stopped here: its directory may already hold a restarted cluster.
      setsid bash -c "while kill -0 $owner 2>/dev/null && kill -0 $pid 2>/dev/null; do sleep 1; done; kill $pid 2>/dev/null; sleep 2; kill -9 $pid 2>/dev/null" \
        >/dev/null 2>&1 </dev/null &
    fi
    echo "$url"
    ;;
  stop)
    if [ -f "$dir/pid" ]; then
      pid="$(cat "$dir/pid")"
      kill -CONT "$pid" 2>/dev/null || true
      kill "$pid" 2>/dev/null || true
      for _ in $(seq 1 20); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
      kill -9 "$pid" 2>/dev/null || true
      rm -f "$dir/pid"
    fi
    rm -rf "$dir/data" "$dir/url" "$dir/details.json"
    ;;
  url)
    running && cat "$dir/url"
    ;;
  fs)
    need
    cp="$(classpath)"
    exec java "${java_opts[@]}" -cp "$dir/conf:$cp" org.apache.hadoop.fs.FsShell "$@" 2> >(grep -v '^SLF4J' >&2)
    ;;
  *)
    sed -n '2,14p' "$0" >&2
    exit 2
    ;;
esac
