"""Sparse encoders (ResNet, ConvNeXt V1/V2), the masked-dense reference, the decoder and SparK."""
