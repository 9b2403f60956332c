# Stand-in for mongo:7.0: FerretDB (a MongoDB wire-protocol server on SQLite, built by
# scripts/start-mongo.sh) behind a `mongod` with compose.yaml's options, and a `mongosh` that
# runs compose.yaml's two scripts (the ping healthcheck and the replica-set/users init).
ARG PYTHON_IMAGE
FROM ${PYTHON_IMAGE}
RUN pip install -q pymongo \
    && useradd --uid 999 --user-group --no-create-home --home-dir /data/db --shell /usr/sbin/nologin mongodb \
    && mkdir -p /data/db /keyfile && chown mongodb:mongodb /data/db /keyfile
COPY ferretdb mongod mongosh /usr/local/bin/
# The member every other member forwards to: FerretDB has no replication (see mongod).
ENV STANDIN_PRIMARY=mongo1:27017
USER 999:999
WORKDIR /data/db
EXPOSE 27017
CMD ["mongod"]
