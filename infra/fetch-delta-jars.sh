#!/usr/bin/env bash
# Fetch the Delta Lake JVM jars once into an ignored cache (default var/jars), then drop the
# transitive jars that pyspark already ships (newer versions; two copies on one classpath break
# Jackson/Hadoop). Idempotent: a complete cache is left alone; offline afterwards.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
dest="${1:-$here/../var/jars}"
python="${PYTHON:-python3}"
mkdir -p "$dest"
# Absolute: Maven resolves a relative outputDirectory against the pom's folder, not the caller's.
dest="$(cd "$dest" && pwd)"
if [ -f "$dest/.complete" ]; then exit 0; fi
command -v mvn >/dev/null || { echo "mvn not found: install Maven (apt-get install maven) to fetch the Delta jars" >&2; exit 1; }
mvn -q -B -f "$here/delta/pom.xml" dependency:copy-dependencies \
  -DoutputDirectory="$dest" -DincludeScope=runtime
spark_jars="$("$python" -c 'import os, pyspark; print(os.path.join(os.path.dirname(pyspark.__file__), "jars"))')"
for jar in "$dest"/*.jar; do
  artifact="$(basename "$jar" | sed -E 's/-[0-9][^-]*\.jar$//')"
  if compgen -G "$spark_jars/${artifact}-[0-9]*.jar" >/dev/null; then rm -f "$jar"; fi
done
ls "$dest"/delta-spark_*.jar >/dev/null
touch "$dest/.complete"
echo "Delta jars in $dest: $(ls "$dest"/*.jar | wc -l)"
