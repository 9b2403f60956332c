# Stand-in for rabbitmq:3.13-management: Debian bookworm's rabbitmq-server (3.10) with the
# management plugin, run as the `rabbitmq` user; RABBITMQ_DEFAULT_USER/_PASS as in the real one.
ARG ROOTFS_IMAGE
FROM ${ROOTFS_IMAGE}
RUN printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d \
    && apt-get update -qq && apt-get install -y -qq --no-install-recommends rabbitmq-server \
    && rm -rf /var/lib/apt/lists/* /var/cache/apt/* /var/log/* \
    && rabbitmq-plugins enable --offline rabbitmq_management \
    && mkdir -p /var/log/rabbitmq /etc/rabbitmq/conf.d \
    && chown -R rabbitmq:rabbitmq /var/log/rabbitmq /etc/rabbitmq
COPY rabbitmq-entrypoint /usr/local/bin/
USER rabbitmq
ENV HOME=/var/lib/rabbitmq RABBITMQ_LOGS=-
EXPOSE 5672 15672
ENTRYPOINT ["rabbitmq-entrypoint"]
CMD ["rabbitmq-server"]
