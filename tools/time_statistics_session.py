"""How much slower a statistics run is than a plain run: the model with every tensor a data-aware criterion
reads (pipeline/activations.consumer_inputs) added as outputs, against the model as it is, in onnxprune's
internal sessions (with and without the shared CPU arena), over the same batches, twice.

    python tools/time_statistics_session.py .cache/bench_calibration/resnet50.onnx \\
        .cache/bench_calibration/resnet50_calib.npz --batch-size 32
"""

from __future__ import annotations

import argparse
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

    print(f"{len(stats)} statistics tensors, {len(feeds)} batches of {args.batch_size}")
    for label, names, shared in (("plain, own arena", plain, False), ("statistics, own arena", stats, False),
                                 ("plain, shared arena", plain, True), ("statistics, shared arena", stats, True)):
        runner = Runner(internal_session(with_outputs(names), shared_arena=shared))
        times, size = [], 0
        for _ in range(2):
            for i, feed in enumerate(feeds):
                start = time.perf_counter()
                out = runner.run(feed, names, release=shared and i == len(feeds) - 1)
                times.append(time.perf_counter() - start)
                size = sum(v.nbytes for v in out.values())
                del out
        print(f"{label:26s} runs (s): {' '.join(f'{t:.2f}' for t in times)}   outputs {size / 2**20:.0f} MiB a batch")


if __name__ == "__main__":
    main()
