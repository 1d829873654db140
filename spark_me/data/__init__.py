"""Images for pretraining: datasets and SparK's augmentation."""
