#!/usr/bin/env bash
# The README's "Training on real data" walkthrough, the same commands (tests/test_real_data.py checks the README
# shows exactly these lines and runs this script on a CelebA-HQ-layout stand-in with the tiny models).
# Step 1 records faces and, matched to them, body boxes (annotate.yaml's default bodies=yolos_tiny, from the hub;
# the test runs it with the tiny stand-ins, faces=tiny bodies=tiny, through ANNOTATE_ARGS).
set -euo pipefail
cd "$(dirname "$0")/.."
# walkthrough:start
DATA=${DATA:-mattymchen/celeba-hq}                       # hub id, or a local copy: hf download ... --local-dir
SD=${SD:-stable-diffusion-v1-5/stable-diffusion-v1-5}    # hub id or a local diffusers folder
DATA_DIR=${DATA_DIR:-data}                               # where the person records go
CELEBA_IDS=${CELEBA_IDS:-celeba/identity_CelebA.txt}     # CelebA's identities (its Anno folder)
HQ_MAPPING=${HQ_MAPPING:-celeba/CelebA-HQ-to-CelebA-mapping.txt}  # from the CelebA-HQ release
VAL_FIRST=${VAL_FIRST:-28000}                            # CelebA-HQ index of the validation split's row 0: check it
RUN=${RUN:-logs/light_celebahq/celebahq-1}               # a fixed run folder: the same command resumes it
EXPORT=${EXPORT:-exports/celebahq-1}
ANNOTATE_ARGS=${ANNOTATE_ARGS:-} TRAIN_ARGS=${TRAIN_ARGS:-} EVAL_ARGS=${EVAL_ARGS:-}  # your extra overrides per step
# 1. Person records (insightface buffalo_l under ~/.insightface/models/) for both splits
python annotate.py input.dataset=$DATA input.split=train output=$DATA_DIR/celebahq/persons_train.jsonl $ANNOTATE_ARGS
python annotate.py input.dataset=$DATA input.split=validation output=$DATA_DIR/celebahq/persons_validation.jsonl $ANNOTATE_ARGS
# 2. Train the Light adapter (SD 1.5, 512², bf16, one GPU)
python train.py experiment=light_celebahq paths.data_dir=$DATA_DIR data.train_source.path=$DATA \
    data.val_source.path=$DATA model.backbone.pretrained_model_name_or_path=$SD hydra.run.dir=$RUN $TRAIN_ARGS
# 3. Who is who in the validation split (the attackers' other-view protocol), then evaluate beside Base and the anchors
python -m camouflage_train.data.identities celebahq --mapping $HQ_MAPPING --celeba-identities $CELEBA_IDS \
    --first-index $VAL_FIRST --out $DATA_DIR/celebahq/identities.jsonl
python evaluate.py experiment=eval_celebahq paths.data_dir=$DATA_DIR data.train_source.path=$DATA \
    data.val_source.path=$DATA light_checkpoint=$RUN/checkpoints/last.ckpt hydra.run.dir=$RUN/eval $EVAL_ARGS
# 4. Export the adapter for stock diffusers pipelines
python export.py checkpoint=$RUN/checkpoints/last.ckpt output=$EXPORT
# walkthrough:end
