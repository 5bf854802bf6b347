"""What the tests and the benchmarks share: a real server process, a REAPI client, moto
in server mode, a fault-injecting proxy. The benchmarks import these, never a test module."""
