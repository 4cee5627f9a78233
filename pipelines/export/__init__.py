"""Export a registered scoring model to ONNX (``onnx.export_model``, needs torch) and score
images with ONNX Runtime (``ort.OnnxScorer`` / ``ort.score_folder``: numpy + PIL, no torch)."""
