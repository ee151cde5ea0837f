FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml alembic.ini ./
COPY schemas schemas
COPY services services
COPY migrations migrations
RUN pip install --no-cache-dir .
ENTRYPOINT ["fluxpipe"]
