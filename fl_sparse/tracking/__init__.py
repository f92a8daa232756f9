"""MLflow tracking: the only layer that imports mlflow. The store (:mod:`~fl_sparse.tracking.store`, no mlflow
import), the tracker callback (:mod:`~fl_sparse.tracking.tracker`), records read back from MLflow
(:mod:`~fl_sparse.tracking.export`) and ``fl-sparse ui`` (:mod:`~fl_sparse.tracking.ui`)."""
