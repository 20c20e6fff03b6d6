"""How much slower a statistics run is than a plain run: the model with every tensor a data-aware criterion
reads (pipeline/activations.consumer_inputs) added as outputs, against the model as it is, in onnxprune's
internal sessions (with and without the shared CPU arena), over the same batches, twice; each run's time and
the fresh pages it faulted in (minor page faults x page size). A last row opens the statistics session in the
shared arena the way onnxprune did before it turned onnxruntime's memory pattern off there (the pattern's one
block is mapped afresh on a session's second and third runs; a stage's session runs once a batch).

    python tools/time_statistics_session.py .cache/bench_calibration/resnet50.onnx \\
        .cache/bench_calibration/resnet50_calib.npz --batch-size 32
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as `python tools/time_statistics_session.py`: the checkout's onnxprune
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    import onnx

    from onnxprune.evaluate.data import load_data
    from onnxprune.io.model_io import load_model
    from onnxprune.pipeline.activations import consumer_inputs
    from onnxprune.pipeline.prepare import prepare
    from onnxprune.runtime.session import Runner, internal_session

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("data")
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    prep = prepare(load_model(args.model))
    feeds = list(load_data(args.data, prep.model, batch_size=args.batch_size).feeds)
    plain = [o.name for o in prep.model.graph.output]
    stats = consumer_inputs(prep)

    def with_outputs(names):
        model = onnx.ModelProto()
        model.CopyFrom(prep.model)
        del model.graph.output[:]
        model.graph.output.extend(onnx.ValueInfoProto(name=n) for n in names)
        return model

    page = os.sysconf("SC_PAGE_SIZE")
    print(f"{len(stats)} statistics tensors, {len(feeds)} batches of {args.batch_size}")
    rows = (("plain, own arena", plain, False, None), ("statistics, own arena", stats, False, None),
            ("plain, shared arena", plain, True, None), ("statistics, shared arena", stats, True, None),
            ("statistics, shared, pattern", stats, True, True))  # None: as onnxprune opens it
    for label, names, shared, pattern in rows:
        runner = Runner(internal_session(with_outputs(names), shared_arena=shared, memory_pattern=pattern))
        times, faulted, size = [], [], 0
        for _ in range(2):
            for i, feed in enumerate(feeds):
                start, faults = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF).ru_minflt
                out = runner.run(feed, names, release=shared and i == len(feeds) - 1)
                times.append(time.perf_counter() - start)
                faulted.append((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) * page / 2**30)
                size = sum(v.nbytes for v in out.values())
                del out
        print(f"{label:28s} runs (s): {' '.join(f'{t:.2f}' for t in times)}   fresh pages (GiB): "
              f"{' '.join(f'{g:.2f}' for g in faulted)}   outputs {size / 2**20:.0f} MiB a batch")


if __name__ == "__main__":
    main()
