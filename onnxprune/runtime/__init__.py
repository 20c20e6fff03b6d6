"""The one place that builds onnxruntime sessions and feeds them batches."""
