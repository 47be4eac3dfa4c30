"""Development tools around the engine, not part of it: benchmarks (`qwen36 bench`, `qwen36 device-bench`), a
load test and an agent-session replay against a live server, and the server fuzzer (`qwen36 fuzz`).

  measure.py        how things are measured: weight bytes a decoded token reads, decode rate from token
                    timestamps, memory and device copy bandwidth, peak RSS
  checkpoints.py    the cached random checkpoints at the real widths the benchmarks run on
  peers.py          the same workload through peers: HF transformers, llama.cpp's llama-bench
  bench.py          `qwen36 bench`: speed and memory of one checkpoint
  bench_serve.py    `qwen36 bench --serve`: load test of a real `qwen36 serve`
  bench_agent.py    `qwen36 bench --agent`: a coding-agent session replayed against a server
  device_bench.py   `qwen36 device-bench`: GPU benchmarks with random weights made on the device
  fuzz.py           `qwen36 fuzz`: mutated and hostile requests, and a soak, against a running server

The engine never imports this package.
"""
