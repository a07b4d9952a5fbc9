"""Dataset registry (images, or (image, label) pairs for class-conditional runs), scalers, augmentation and the
endless batch iterator."""
from datasets import cifar10, digits, image_folder, tfds_backend  # noqa: F401  (register the datasets)
from datasets.batch import Batch, collate
from datasets.loader import ResidentBatches, dataset_tensor, endless_batches
from datasets.registry import DATA_BACKENDS, get_dataset, registered_datasets, wants_labels
from datasets.transforms import augment, get_data_inverse_scaler, get_data_scaler

__all__ = ['DATA_BACKENDS', 'Batch', 'ResidentBatches', 'augment', 'collate', 'dataset_tensor', 'endless_batches',
           'get_data_inverse_scaler', 'get_data_scaler', 'get_dataset', 'registered_datasets', 'wants_labels']
