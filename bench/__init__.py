"""ctlpool's load tests: ``python -m bench SCENARIO [options]`` (see bench/README.md).

Data flow of a scenario run:

    bench.load (publisher processes, pool.publisher)  --events-->  RabbitMQ  -->
        the pool: ``ctlpool run`` subprocess (bench.poolproc) running bench.controllers,
                  whose reconciles write binary records (bench.records)
        the floor: bare pika consumer processes on the same kind of queues (bench.floor)
    bench.measure  tails records / counters, draws the progress line, samples RSS and CPU,
                   and turns a finished load into figures (lost, overlaps, events/s, latency)
    bench.scenarios  compose loads and consumers;  bench.report  writes results.json and the
                   table;  bench.plots  draws PNGs when matplotlib is importable.

``bench.profile_worker`` runs one ``pool.worker.Worker`` in-process under cProfile to split
its CPU per event between the pool's own code and pika. ``bench/micro`` holds the
pytest-benchmark micro-benchmarks (separate).
"""
