"""Run under an emulated CPU (qemu-user): top-1 of ONNX models with onnxruntime's kernels on that CPU.

Usage: qemu-x86_64 -cpu Haswell python emulated_eval.py spec.json  ->  prints one JSON object
{name: {"kernels": acc, "exact": acc}} (plus {name: {"kernels_top1": [...], "exact_top1": [...]}} with "predictions").
spec: {"data": "x.npy", "labels": "y.npy", "models": {name: path}, "threads": 1, "predictions": false}.
A path ending in .xml is an OpenVINO IR, run by OpenVINO's CPU plugin (fp32 hint; "kernels" only).  "kernels" runs with
onnxruntime's default graph optimizations (its fused int8 kernels for this CPU), "exact" with them off
(QDQ as written).  Kept free of edgeopt imports so it starts fast under emulation.
"""

import json
import sys

import numpy as np
import onnxruntime as ort

spec = json.load(open(sys.argv[1]))
x, y = np.load(spec["data"]), np.load(spec["labels"])
out = {}
for name, path in spec["models"].items():
    res = {}
    if path.endswith(".xml"):
        import openvino as ov

        compiled = ov.Core().compile_model(path, "CPU", {"INFERENCE_PRECISION_HINT": "f32",
                                                          "INFERENCE_NUM_THREADS": int(spec.get("threads", 1))})
        logits = np.concatenate([np.asarray(compiled(x[i:i + 1])[0]) for i in range(len(x))])
        res["kernels"] = float((logits.argmax(1) == y).mean())
        out[name] = res
        continue
    for key, level in (("kernels", ort.GraphOptimizationLevel.ORT_ENABLE_ALL), ("exact", ort.GraphOptimizationLevel.ORT_DISABLE_ALL)):
        so = ort.SessionOptions()
        so.graph_optimization_level = level
        so.intra_op_num_threads = int(spec.get("threads", 1))
        sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
        name_in = sess.get_inputs()[0].name
        logits = np.concatenate([sess.run(None, {name_in: x[i:i + 1]})[0] for i in range(len(x))])
        res[key] = float((logits.argmax(1) == y).mean())
        if spec.get("predictions"):
            res[f"{key}_top1"] = logits.argmax(1).tolist()
    out[name] = res
print(json.dumps(out))
