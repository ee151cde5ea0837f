FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml alembic.ini ./
COPY schemas schemas
COPY services services
COPY migrations migrations
RUN pip install --no-cache-dir . \
 && useradd --system --uid 10001 --home-dir /app --shell /usr/sbin/nologin fluxpipe \
 && mkdir -p /storage && chown fluxpipe /storage
USER fluxpipe
ENTRYPOINT ["fluxpipe"]
