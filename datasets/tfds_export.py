"""The TensorFlow side of ``data.backend='tfds'``: a child process that reads images through tensorflow-datasets /
tf.data and streams them, decoded, to the torch process (datasets/tfds_backend.py), which caches them.

Loading TensorFlow into a process that holds torch crashes, so TensorFlow is imported only inside the export
functions, which run only when this file runs as a script; the torch process imports it for the stream format
and exit codes alone. Its imports: the standard library, numpy, tensorflow and tensorflow_datasets.

Stream on stdout (little-endian): the image count N as int64, then N records of
  (index int64, height int32, width int32, channels int32) followed by height * width * channels uint8 bytes,
the image in (H, W, C) order; records may come in any order, ``index`` says where each belongs. The cifar10
command then sends the N class labels, int64 in index order.

Commands:
  cifar10 ROOT SPLIT DOWNLOAD  CIFAR-10 through tfds.builder('cifar10', data_dir=ROOT): a tfds dataset prepared
                               under ROOT, else one prepared from ROOT/cifar-10-binary.tar.gz or a download
                               (DOWNLOAD=1); index is the position in the original archive (the tfds id), the order
                               torchvision reads. Ends with the labels.
  files LIST_JSON              The image files listed in LIST_JSON, decoded by TensorFlow to RGB; index is the
                               position in the list.
Exit status 3: the source is missing; 4: the source is unreadable (bad checksum, undecodable image). The reason is
the last stderr line, after ERROR_PREFIX.
"""
import json
import os
import struct
import sys

import numpy as np

ERROR_PREFIX = 'tfds_export error: '
EXIT_MISSING, EXIT_UNREADABLE = 3, 4
COUNT_FORMAT, RECORD_FORMAT, LABEL_FORMAT = '<q', '<qiii', '<q'
CIFAR10_ARCHIVE = 'cifar-10-binary.tar.gz'
CIFAR10_URL = 'https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz'


class ExportError(Exception):

  def __init__(self, status, message):
    super().__init__(message)
    self.status = status


def write_record(stream, index, image):
  """One (H, W, C) uint8 image at position ``index``."""
  image = np.ascontiguousarray(image, dtype=np.uint8)
  stream.write(struct.pack(RECORD_FORMAT, index, *image.shape))
  stream.write(image.tobytes())


def export_cifar10(stream, root, split, download):
  import tensorflow_datasets as tfds

  builder = tfds.builder('cifar10', data_dir=root)
  if not builder.is_prepared():
    # manual_dir=ROOT: tfds takes ROOT/cifar-10-binary.tar.gz instead of downloading, after checking its sha256.
    config = tfds.download.DownloadConfig(manual_dir=root, try_download_gcs=False)
    if not download and not os.path.isfile(os.path.join(root, CIFAR10_ARCHIVE)):
      raise ExportError(EXIT_MISSING, f'no prepared tfds cifar10 and no {CIFAR10_ARCHIVE} under {root!r}')
    try:
      builder.download_and_prepare(download_config=config)
    except Exception as error:  # tfds's NonMatchingChecksumError is not part of its public API.
      if type(error).__name__ != 'NonMatchingChecksumError':
        raise
      raise ExportError(EXIT_UNREADABLE, f'{os.path.join(root, CIFAR10_ARCHIVE)!r} is not the official archive of '
                                         f'{CIFAR10_URL}: its sha256 differs from the one tfds registered') from error
  count = builder.info.splits[split].num_examples
  stream.write(struct.pack(COUNT_FORMAT, count))
  labels = np.full(count, -1, dtype=np.int64)
  # tfds stores the examples shuffled by a hash of their key; the id 'train_00042' keeps the archive position.
  for batch in tfds.as_numpy(builder.as_dataset(split=split, shuffle_files=False).batch(1024)):
    for example_id, image, label in zip(batch['id'], batch['image'], batch['label']):  # image: (32, 32, 3)
      index = int(example_id.decode().rsplit('_', 1)[1])
      write_record(stream, index, image)
      labels[index] = label
  if (labels < 0).any():
    raise ExportError(EXIT_UNREADABLE, f'the tfds cifar10 under {root!r} lacks the examples '
                                       f'{np.flatnonzero(labels < 0)[:5].tolist()} of its {split} split')
  stream.write(labels.astype('<i8').tobytes())  # N values of LABEL_FORMAT.


def export_files(stream, list_path):
  import tensorflow as tf

  with open(list_path, encoding='utf-8') as handle:
    files = json.load(handle)

  def decode(path):
    contents = tf.io.read_file(path)
    # JPEG with the accurate integer IDCT, as Pillow decodes it; PNG and WebP are lossless to decode. RGB always:
    # the torch side converts to grayscale with Pillow when data.num_channels=1, as the torchvision path does.
    return tf.cond(tf.io.is_jpeg(contents),
                   lambda: tf.io.decode_jpeg(contents, channels=3, dct_method='INTEGER_ACCURATE'),
                   lambda: tf.io.decode_image(contents, channels=3, expand_animations=False))

  dataset = tf.data.Dataset.from_tensor_slices(tf.constant(files, tf.string)).map(
      decode, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  stream.write(struct.pack(COUNT_FORMAT, len(files)))
  iterator = iter(dataset)
  for index in range(len(files)):
    try:
      image = next(iterator).numpy()  # (H, W, 3)
    except (tf.errors.InvalidArgumentError, tf.errors.NotFoundError) as error:
      raise ExportError(EXIT_UNREADABLE, f'TensorFlow cannot read the image {files[index]!r} '
                                         f'({str(error).splitlines()[0]})') from error
    write_record(stream, index, image)


def main(argv):
  # The script's folder holds the torch-side modules of the package; they must not shadow installed ones.
  here = os.path.dirname(os.path.abspath(__file__))
  sys.path[:] = [p for p in sys.path if os.path.abspath(p or '.') != here]
  # The data stream keeps the real stdout; anything a library prints goes to stderr instead.
  stream = os.fdopen(os.dup(sys.stdout.fileno()), 'wb')
  os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
  try:
    if argv[0] == 'cifar10':
      export_cifar10(stream, argv[1], argv[2], argv[3] == '1')
    elif argv[0] == 'files':
      export_files(stream, argv[1])
    else:
      raise ExportError(2, f'unknown command {argv[0]!r}; valid: cifar10, files')
    stream.close()
  except ExportError as error:
    sys.stderr.write(f'\n{ERROR_PREFIX}{error}\n')
    return error.status
  return 0


if __name__ == '__main__':
  sys.exit(main(sys.argv[1:]))
