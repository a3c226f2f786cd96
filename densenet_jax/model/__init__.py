"""The network, readable without any file or Hub code.

config      DenseNetConfig: every field that fixes a DenseNet, its channel plan and parameter count
layers      Conv2d, BatchNorm, Linear and the poolings, with torch's semantics
stem        torchvision's 7x7 stem, the paper's 3x3 CIFAR stem, timm's deep stems and BlurPool
remat       the memory-efficient dense block: its backward pass recomputes one layer at a time
densenet    DenseLayer, DenseBlock, Transition, Trunk, DenseNet: the paper's modules
features    DenseNetFeatures and feature_info: the backbone, as timm's ``features_only``
pretrained_cfg  PretrainedCfg: where weights live and how their images are prepared
registry    the names: architectures, the paper's family, pretrained tags and their cfgs
memory      what a training step saves for its backward pass (the measure memory_efficient shrinks)
"""
