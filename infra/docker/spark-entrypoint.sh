#!/usr/bin/env bash
# Entrypoint of the Spark image (infra/docker/Dockerfile). Spark on Kubernetes launches executors
# (and, in cluster deploy mode, the driver) with a first argument `executor`/`driver` and expects
# the image to start the right JVM class, as Spark's own images do (resource-managers/kubernetes/
# docker/src/main/dockerfiles/spark/entrypoint.sh); the pip distribution of pyspark does not ship
# that script, so this is its subset for our image. `master`/`worker` run the standalone cluster.
set -euo pipefail
SPARK_CLASSPATH="${SPARK_HOME}/jars/*:/opt/jiuzhang-lake/var/jars/*"
case "${1:-}" in
  executor)
    shift
    exec "${JAVA_HOME}/bin/java" ${SPARK_JAVA_OPT_0:-} -Xms"${SPARK_EXECUTOR_MEMORY}" -Xmx"${SPARK_EXECUTOR_MEMORY}" \
      -cp "${SPARK_CLASSPATH}" org.apache.spark.scheduler.cluster.k8s.KubernetesExecutorBackend \
      --driver-url "${SPARK_DRIVER_URL}" --executor-id "${SPARK_EXECUTOR_ID}" --cores "${SPARK_EXECUTOR_CORES}" \
      --app-id "${SPARK_APPLICATION_ID}" --hostname "${SPARK_EXECUTOR_POD_IP}" \
      --resourceProfileId "${SPARK_RESOURCE_PROFILE_ID}" --podName "${SPARK_EXECUTOR_POD_NAME}" "$@"
    ;;
  driver)
    shift
    exec "${SPARK_HOME}/bin/spark-submit" --conf "spark.driver.bindAddress=${SPARK_DRIVER_BIND_ADDRESS}" \
      --deploy-mode client "$@"
    ;;
  master)
    exec "${SPARK_HOME}/bin/spark-class" org.apache.spark.deploy.master.Master --host 0.0.0.0 --port 7077 \
      --webui-port 8081
    ;;
  worker)
    shift
    exec "${SPARK_HOME}/bin/spark-class" org.apache.spark.deploy.worker.Worker --webui-port 8082 "$@"
    ;;
  *)
    exec "$@"
    ;;
esac
