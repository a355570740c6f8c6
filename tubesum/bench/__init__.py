"""`tubesum bench`: the batching study (chunk sizes against throughput, the baseline beside it),
kept out of the worker package; it drives the same engine the GPU worker loads."""
