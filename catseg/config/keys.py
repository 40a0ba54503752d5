"""Every config key catseg adds to detectron2's defaults, in one place, one comment each.

Official CAT-Seg key names are kept so that official config files load unchanged; keys
that the official code hard-codes (sliding-window geometry, CLIP and backbone input sizes)
are new keys whose defaults are the official values. `RELEASES` holds the keys that make a
model one CAT-Seg release or the other (MODEL.RELEASE; see `apply_release`).
"""
from detectron2.config import CfgNode as CN
from detectron2.projects.deeplab import add_deeplab_config

# MODEL.RELEASE -> the keys under MODEL.SEM_SEG_HEAD that make the model that CAT-Seg release
# (what the official code of each release hard-codes). A config file or override that sets one
# of these keys wins over the preset.
RELEASES = {
    "v1": {"GUIDANCE_SOURCE": "backbone", "CLIP_DENSE_BLOCK": "v1", "CLIP_ATTN_WEIGHTS": "packed",
           "TEXT_SYNONYMS": "average", "CLASS_PAD_LENGTH": 0},
    "cvpr24": {"GUIDANCE_SOURCE": "clip", "CLIP_DENSE_BLOCK": "cvpr24", "CLIP_ATTN_WEIGHTS": "split",
               "TEXT_SYNONYMS": "first", "CLASS_PAD_LENGTH": 256},
}


def apply_release(cfg, release: str) -> None:
    """Set MODEL.RELEASE and its preset keys (`RELEASES`) in `cfg` (in place, not frozen)."""
    cfg.MODEL.RELEASE = release  # the preset's name, kept in the config
    for key, value in RELEASES[release].items():
        cfg.MODEL.SEM_SEG_HEAD[key] = value  # each overridable: the file and the overrides merge after


def add_catseg_config(cfg):
    """Add catseg's keys to a detectron2 config (in place). Call once per cfg."""
    # DeepLab's keys (MODEL.RESNETS.STEM_TYPE, ...) are part of the official configs.
    add_deeplab_config(cfg)
    # ---------------------------------------------------------------- input / data
    cfg.INPUT.DATASET_MAPPER_NAME = "mask_former_semantic"  # training mapper ("mask_former_semantic")
    cfg.INPUT.COLOR_AUG_SSD = False  # SSD-style photometric augmentation during training
    cfg.INPUT.CROP.SINGLE_CATEGORY_MAX_AREA = 1.0  # crop retries until no class covers more than this share
    cfg.INPUT.SIZE_DIVISIBILITY = -1  # training: pad image/label to a multiple of this (-1: off)
    cfg.INPUT.MAX_IMAGE_PIXELS = 100_000_000  # predictor/demo: files with more pixels refused from the header (0: any)
    cfg.DATALOADER.CORRUPT_LABELS = "error"  # custom data, corrupt label / image: "error" (one line), "skip" (counted)
    cfg.DATASETS.CUSTOM = []  # custom datasets: "name:image_dir:label_dir:classes.json[:ignore]" (ignore default 255)

    # ---------------------------------------------------------------- solver
    cfg.SOLVER.OPTIMIZER = "ADAMW"  # "ADAMW" or "SGD"
    cfg.SOLVER.BACKBONE_MULTIPLIER = 0.1  # lr factor for parameters under modules named *backbone*
    cfg.SOLVER.CLIP_MULTIPLIER = 0.01  # lr factor for parameters under modules named *clip_model*
    cfg.SOLVER.WEIGHT_DECAY_EMBED = 0.0  # weight decay of nn.Embedding parameters
    # detectron2's key with catseg's meaning (not detectron2's fp16 AMPTrainer): the training forward
    # (CATSeg.run_network) under bfloat16 autocast; loss, weights, gradients, optimizer state fp32.
    cfg.SOLVER.AMP.ENABLED = False  # approximate: train under bfloat16 autocast, CPU or GPU, no GradScaler

    # ---------------------------------------------------------------- meta-architecture
    cfg.MODEL.RELEASE = "v1"  # CAT-Seg release, "v1" or "cvpr24": presets the keys of RELEASES (each overridable)
    cfg.MODEL.MASK_FORMER = CN()
    cfg.MODEL.MASK_FORMER.SIZE_DIVISIBILITY = 32  # inference: pad each image to a multiple of this
    cfg.MODEL.BACKBONE_RESOLUTION = (384, 384)  # (h, w) the guidance backbone sees (official: 384x384)
    cfg.MODEL.CHECKPOINT_STRICT = False  # error (not just a report) on missing/unexpected checkpoint keys

    # ---------------------------------------------------------------- Swin guidance backbone
    cfg.MODEL.SWIN = CN()
    cfg.MODEL.SWIN.PRETRAIN_IMG_SIZE = 224  # image size the Swin weights were trained at
    cfg.MODEL.SWIN.PATCH_SIZE = 4  # patch-embedding stride
    cfg.MODEL.SWIN.EMBED_DIM = 96  # channels of the first stage
    cfg.MODEL.SWIN.DEPTHS = [2, 2, 6, 2]  # blocks per stage
    cfg.MODEL.SWIN.NUM_HEADS = [3, 6, 12, 24]  # attention heads per stage
    cfg.MODEL.SWIN.WINDOW_SIZE = 7  # attention window side
    cfg.MODEL.SWIN.MLP_RATIO = 4.0  # MLP hidden size / channels
    cfg.MODEL.SWIN.QKV_BIAS = True  # bias in the qkv projection
    cfg.MODEL.SWIN.QK_SCALE = None  # attention scale (None: head_dim ** -0.5)
    cfg.MODEL.SWIN.DROP_RATE = 0.0  # dropout after MLP / projections
    cfg.MODEL.SWIN.ATTN_DROP_RATE = 0.0  # dropout on attention weights
    cfg.MODEL.SWIN.DROP_PATH_RATE = 0.3  # stochastic depth, linearly increasing over blocks
    cfg.MODEL.SWIN.APE = False  # absolute position embedding
    cfg.MODEL.SWIN.PATCH_NORM = True  # LayerNorm after patch embedding
    cfg.MODEL.SWIN.OUT_FEATURES = ["res2", "res3", "res4", "res5"]  # stages to output
    cfg.MODEL.SWIN.USE_CHECKPOINT = False  # activation checkpointing in each block

    # ---------------------------------------------------------------- ViT guidance backbone (D2ViT)
    cfg.MODEL.VIT = CN()
    cfg.MODEL.VIT.NAME = "vit_base_patch16_384"  # timm ViT architecture, "arch" or "arch.pretrained_tag" (patch 16)
    cfg.MODEL.VIT.PRETRAINED = False  # download timm's weights for NAME (needs network access)
    cfg.MODEL.VIT.WEIGHTS = ""  # local checkpoint, timm or D2ViT key layout, loaded after PRETRAINED
    cfg.MODEL.VIT.IMG_SIZE = 384  # side of the position-embedding grid (resampled for other inputs)
    cfg.MODEL.VIT.EMBED_DIM = 0  # token channels (0: the architecture's)
    cfg.MODEL.VIT.DEPTH = 0  # transformer blocks (0: the architecture's)
    cfg.MODEL.VIT.NUM_HEADS = 0  # attention heads (0: the architecture's)
    cfg.MODEL.VIT.DROP_PATH_RATE = 0.1  # stochastic depth, linearly increasing over blocks
    cfg.MODEL.VIT.OUT_CHANNELS = 256  # channels of every simple-feature-pyramid output
    cfg.MODEL.VIT.OUT_FEATURES = ["res2", "res3", "res4"]  # outputs among res2..res5 (strides 4..32)

    # ---------------------------------------------------------------- Twins guidance backbone (D2Twins)
    cfg.MODEL.TWINS = CN()
    cfg.MODEL.TWINS.NAME = "twins_svt_small"  # timm twins_svt_* or twins_pcpvt_* architecture ("arch[.tag]")
    cfg.MODEL.TWINS.PRETRAINED = False  # download timm's weights for NAME (needs network access)
    cfg.MODEL.TWINS.WEIGHTS = ""  # local checkpoint, timm or D2Twins key layout, loaded after PRETRAINED
    cfg.MODEL.TWINS.EMBED_DIMS = []  # channels per stage ([]: the architecture's)
    cfg.MODEL.TWINS.DEPTHS = []  # blocks per stage ([]: the architecture's)
    cfg.MODEL.TWINS.NUM_HEADS = []  # attention heads per stage ([]: the architecture's)
    cfg.MODEL.TWINS.DROP_PATH_RATE = 0.2  # stochastic depth, linearly increasing over blocks
    cfg.MODEL.TWINS.OUT_FEATURES = ["res2", "res3", "res4"]  # stages among res2..res5 (strides 4..32)

    # ---------------------------------------------------------------- Cluster guidance backbone (D2ClusterBackbone)
    cfg.MODEL.CLUSTER = CN()
    cfg.MODEL.CLUSTER.VARIANT = "cluster_tiny"  # "cluster_tiny"/"cluster_small" (catseg/modeling/backbone/cluster.py)
    cfg.MODEL.CLUSTER.WEIGHTS = ""  # local checkpoint in the native key layout (manifests/*.tsv)
    cfg.MODEL.CLUSTER.EMBED_DIMS = []  # channels per stage ([]: the variant's)
    cfg.MODEL.CLUSTER.DEPTHS = []  # ClusterBlocks per stage ([]: the variant's)
    cfg.MODEL.CLUSTER.HEADS = []  # clustering heads per stage ([]: the variant's)
    cfg.MODEL.CLUSTER.HEAD_DIMS = []  # channels per clustering head per stage ([]: the variant's)
    cfg.MODEL.CLUSTER.WINDOW_SIZES = []  # clustering region side in points per stage ([]: the variant's)
    cfg.MODEL.CLUSTER.NUM_CLUSTERING = -1  # centre-refinement attention rounds (-1: the variant's)
    cfg.MODEL.CLUSTER.DROP_PATH_RATE = 0.1  # stochastic depth, linearly increasing over blocks
    cfg.MODEL.CLUSTER.OUT_FEATURES = ["res2", "res3", "res4"]  # stages among res2..res5 (strides 4..32)

    # ---------------------------------------------------------------- CATSeg head
    head = cfg.MODEL.SEM_SEG_HEAD
    head.TRAIN_CLASS_JSON = "coco.json"  # class names for training: a shipped list name or a JSON path
    head.TEST_CLASS_JSON = "coco.json"  # class names for inference: a shipped list name or a JSON path
    head.CLIP_PRETRAINED = "ViT-B/16"  # CLIP: official name, "open_clip:ARCH[:TAG]", or a checkpoint path
    head.CLIP_MODEL = ""  # open_clip architecture overriding the one implied by CLIP_PRETRAINED
    head.CLIP_WEIGHTS = "pretrained"  # "pretrained" (not read if MODEL.WEIGHTS holds CLIP), "random", path, hf:// name
    head.CLIP_RANDOM_SEED = 0  # seed for CLIP_WEIGHTS "random"
    head.CLIP_RESOLUTION = ()  # (h, w) CLIP input; empty: 384x384 for ViT-B/16, 336x336 otherwise
    head.CLIP_PIXEL_MEAN = [122.7709383, 116.7460125, 104.09373615]  # CLIP normalisation mean (RGB, 0-255)
    head.CLIP_PIXEL_STD = [68.5005327, 66.6321579, 70.3231630]  # CLIP normalisation std (RGB, 0-255)
    head.CLIP_FINETUNE = "attention"  # CLIP tuning: "attention"/"full" (v1), "qv"/"blocks" (CVPR'24), "prompt", "none"
    head.CLIP_DENSE_BLOCK = "v1"  # dense pass's last vision block: "v1" (x + value) or "cvpr24" (class-token residual)
    head.CLIP_ATTN_WEIGHTS = "packed"  # CLIP attention weights: "packed" in_proj_weight (v1) or "split" q/k/v (CVPR'24)
    head.GUIDANCE_SOURCE = "backbone"  # guidance maps: "backbone" (MODEL.BACKBONE, v1) or "clip" (CLIP blocks, CVPR'24)
    head.CLIP_GUIDANCE_BLOCKS = []  # GUIDANCE_SOURCE "clip": 0-based vision blocks ([]: ViT-B/16 [3, 7], else [7, 15])
    head.PROMPT_DEPTH = 0  # visual prompt tuning: number of blocks that get prompts
    head.PROMPT_LENGTH = 0  # visual prompt tuning: prompt tokens per block
    head.PROMPT_ENSEMBLE_TYPE = "imagenet"  # text templates: "imagenet" (80), "imagenet_select" (8), "single", "name"
    head.TEXT_SYNONYMS = "average"  # "sky, heaven": "average" the synonym embeddings (v1) or use the "first" (CVPR'24)
    head.TEXT_CACHE_DIR = ""  # on-disk text-embedding cache ("" : $CATSEG_CACHE or ~/.cache/catseg)
    head.TEXT_CACHE = True  # keep text embeddings on disk under TEXT_CACHE_DIR (catseg/modeling/text.py)
    head.TEXT_GUIDANCE_DIM = 0  # CLIP embedding size (text guidance input; 0: derived, else must match)
    head.TEXT_GUIDANCE_PROJ_DIM = 128  # projected text guidance size
    head.APPEARANCE_GUIDANCE_DIM = 0  # channels of the deepest guidance map (0: derived, else must match)
    head.APPEARANCE_GUIDANCE_PROJ_DIM = 128  # projected appearance guidance size
    head.DECODER_DIMS = [64, 32]  # channels of the two upsampling decoder stages
    head.DECODER_GUIDANCE_DIMS = []  # decoder guidance channels (backbone: [] derives; "clip": the upsamplers' outputs)
    head.DECODER_GUIDANCE_PROJ_DIMS = [32, 16]  # projected decoder guidance sizes
    head.NUM_LAYERS = 4  # aggregator layers (spatial + class aggregation)
    head.NUM_HEADS = 4  # attention heads in the aggregator
    head.HIDDEN_DIMS = 128  # aggregator channels
    head.POOLING_SIZES = [2, 2]  # pooling before class aggregation (inference: TEST.POOLING_SIZES when set)
    head.FEATURE_RESOLUTION = []  # CLIP token grid (h, w) ([]: derived from the CLIP input size and patch size)
    head.WINDOW_SIZES = 12  # spatial aggregation window side
    head.ATTENTION_TYPE = "linear"  # class aggregation attention: "linear" or "full"
    head.CLASS_CHUNK_SIZE = 0  # classes per chunk in spatial blocks / decoder (0: from MEMORY_BUDGET_MB)
    head.MEMORY_BUDGET_MB = 1024  # activation budget (MB) that sizes the class / position chunks at inference
    # (and the class chunks of training, which are recomputed one at a time with CHECKPOINT_ACTIVATIONS)
    # spatial blocks and decoder run over class chunks sized by MEMORY_BUDGET_MB
    # CHECKPOINT_ACTIVATIONS: exact, less memory.
    head.CHECKPOINT_ACTIVATIONS = False  # training: recompute aggregator layers / decoder in backward
    # CLASS_PAD_LENGTH: above this many classes, keep the best this many.
    head.CLASS_PAD_LENGTH = 0  # CVPR'24 (256): pad the class attention to this many classes
    head.CPU_CHUNK_MB = 96  # on CPU, chunks also stay under this many MB (cache- and allocator-friendly; 0: off)

    # ---------------------------------------------------------------- SAM-refined mode
    # (front door; catseg/app/sam_refine.py)
    cfg.MODEL.SAM = CN()
    cfg.MODEL.SAM.WEIGHTS = ""  # Segment Anything checkpoint (path or hf:// name) for --refine sam
    cfg.MODEL.SAM.TYPE = "vit_h"  # its architecture: "vit_h", "vit_l" or "vit_b" (segment-anything's registry)
    cfg.MODEL.SAM.POINTS_PER_SIDE = 32  # automatic masks: point prompts per image side

    # ---------------------------------------------------------------- inference
    cfg.TEST.POOLING_SIZES = []  # class-aggregation pooling at inference ([]: MODEL.SEM_SEG_HEAD.POOLING_SIZES)
    cfg.TEST.SLIDING_WINDOW = False  # sliding-window inference (official evaluation protocol)
    cfg.TEST.SLIDING_KERNEL = 384  # sliding window crop side
    cfg.TEST.SLIDING_OVERLAP = 0.333  # overlap between crops (stride = int(kernel * (1 - overlap)))
    cfg.TEST.SLIDING_OUT_RES = (640, 640)  # image is resized to this before cropping
    cfg.TEST.BF16 = False  # approximate: run inference under bfloat16 autocast
    cfg.TEST.OUTPUT = "probs"  # "probs" (T, H, W) or "labels" (argmax, top-k by class chunks); evaluation: always probs
    cfg.TEST.TOPK = 3  # TEST.OUTPUT "labels": classes kept per pixel, best first, with their scores
    cfg.TEST.MAX_INPUT_SIDE = 1280  # OpenVocabPredictor: longer images are first downscaled to this side (0: never)

    # ---------------------------------------------------------------- recipes: official keys, backbone init, TTA
    # Keys of the official CAT-Seg code at their official place, so that official files load
    # unchanged (catseg/config/official.py). A mapped key, when set, is copied by load_config to
    # catseg's key and wins over it; the accepted keys change nothing in the official code either.
    cfg.MODEL.PROMPT_ENSEMBLE_TYPE = ""  # official place of SEM_SEG_HEAD.PROMPT_ENSEMBLE_TYPE ("": use that one)
    cfg.MODEL.CLIP_PIXEL_MEAN = []  # official place of SEM_SEG_HEAD.CLIP_PIXEL_MEAN ([]: use that one)
    cfg.MODEL.CLIP_PIXEL_STD = []  # official place of SEM_SEG_HEAD.CLIP_PIXEL_STD ([]: use that one)
    cfg.MODEL.PROMPT_ENSEMBLE = False  # accepted only: declared but read by no official code path
    cfg.DATASETS.VAL_ALL = ()  # accepted only: declared but read by no official code path
    head.TRAIN_CLASS_INDEXES = ""  # accepted only: official zero-shot split file, read by no official code path
    head.TEST_CLASS_INDEXES = ""  # accepted only: official zero-shot split file, read by no official code path
    # Guidance-backbone initialisation for training from scratch (catseg/weights/pretrained.py),
    # used when MODEL.WEIGHTS is "" and nothing is resumed.
    cfg.MODEL.BACKBONE.PRETRAINED = ""  # "timm:ARCH.TAG", "torchvision:ARCH.WEIGHTS" or a local file
