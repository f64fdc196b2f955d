"""The benchmark bodies behind ``lull bench*``, ``lull calibrate`` and ``lull chaos``: each
module holds one command's parser and the measurement it runs."""
