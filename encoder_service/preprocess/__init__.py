"""Preprocessing, after an item is planned (`contract.plan`): `cpu` decodes, resizes and tiles on the host
(in the preprocessing workers, `serving.host.preprocess_workers`); `device` resizes and tiles decoded
images on the GPU, bit for bit as `cpu` does."""
