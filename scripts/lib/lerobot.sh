# LeRobot 0.4.x policy folder for openpi-to-pytorch.sh --lerobot (sourced; uses its variables:
# OUT, CKPT, ASSETS, BIN, HERE, VARIANT, PRECISION, HORIZON, ACTION_DIM, LISTING, ASSET_ID, CAMERAS).
#
# Every file is written as LeRobot 0.4.4 writes it (docs/formats.md, "LeRobot policy folder"):
#   config.json                    draccus.dump of PI0Config / PI05Config (indent 4), the defaults
#                                  but for the features, max_state_dim/max_action_dim, chunk_size,
#                                  n_action_steps and dtype
#   policy_preprocessor.json       DataProcessorPipeline._save_pretrained of the pipeline
#   policy_postprocessor.json      make_pi0(5)_pre_post_processors builds (json, indent 2)
#   policy_preprocessor_step_N_normalizer_processor.safetensors     N = 5 (pi0) or 2 (pi0.5)
#   policy_postprocessor_step_0_unnormalizer_processor.safetensors  the same stats
# The stats come from openpi's assets/ID/norm_stats.json: state -> observation.state,
# actions -> action, one float32 1-D tensor per stat (FEATURE.mean, .std, .q01, .q99).

lerobot_die() { echo "openpi-to-pytorch: $*" >&2; exit "${LEROBOT_EXIT:-65}"; }

# Finds and converts the norm stats; sets STATS_FILE, STATS_BYTES (printf %b escapes),
# STATE_FEATURE_DIM, ACTION_FEATURE_DIM, MAX_STATE_DIM, MAX_ACTION_DIM.
lerobot_stats() {
    local assets="$ASSETS" found line kind a b
    if [ -n "$ASSET_ID" ]; then
        STATS_FILE="$assets/$ASSET_ID/norm_stats.json"
        [ -f "$STATS_FILE" ] || LEROBOT_EXIT=66 lerobot_die "--asset-id $ASSET_ID: $STATS_FILE does not exist"
    else
        found="$(cd "$assets" 2>/dev/null && for d in */; do [ -f "$d/norm_stats.json" ] && echo "${d%/}"; done || true)"
        case "$(grep -c . <<<"$found")" in
        1) STATS_FILE="$assets/$found/norm_stats.json" ;;
        0) LEROBOT_EXIT=66 lerobot_die "--lerobot needs norm stats: no $assets/*/norm_stats.json" ;;
        *) LEROBOT_EXIT=64 lerobot_die "--lerobot: several asset folders have norm_stats.json ($(tr '\n' ' ' <<<"$found")): choose one with --asset-id" ;;
        esac
    fi
    local parsed
    parsed="$(awk -v map="state=observation.state,actions=action" -f "$HERE/scripts/lib/norm-stats-safetensors.awk" "$STATS_FILE")" \
        || exit 65
    STATE_FEATURE_DIM="" ACTION_FEATURE_DIM="" STATS_BYTES=""
    while IFS=$'\t' read -r kind a b; do
        case "$kind" in
        dims) case "$a" in observation.state) STATE_FEATURE_DIM="$b" ;; action) ACTION_FEATURE_DIM="$b" ;; esac ;;
        note) echo "openpi-to-pytorch: $STATS_FILE: $a" >&2 ;;
        file) STATS_BYTES="$a" ;;
        esac
    done <<<"$parsed"
    [ -n "$STATE_FEATURE_DIM" ] || lerobot_die "$STATS_FILE has no stats for state"
    [ -n "$ACTION_FEATURE_DIM" ] || lerobot_die "$STATS_FILE has no stats for actions"
    # The model's padded sizes: action_in_proj's input; pi0's state_proj input (pi0.5 has no
    # state_proj: it tokenizes the state, padded to LeRobot's default 32).
    MAX_ACTION_DIM="${ACTION_DIM:-32}"
    MAX_STATE_DIM="$(awk '$1 == "state_proj/kernel" { gsub(/[][]/, "", $3); split($3, s, ","); print s[1] }' <<<"$LISTING")"
    MAX_STATE_DIM="${MAX_STATE_DIM:-32}"
    [ "$ACTION_FEATURE_DIM" -le "$MAX_ACTION_DIM" ] || lerobot_die "actions stats have $ACTION_FEATURE_DIM numbers, the model's actions $MAX_ACTION_DIM"
    [ "$STATE_FEATURE_DIM" -le "$MAX_STATE_DIM" ] || lerobot_die "state stats have $STATE_FEATURE_DIM numbers, the model's state $MAX_STATE_DIM"
    # What every stat must have for the normalization LeRobot applies (pi0: MEAN_STD, pi0.5: QUANTILES).
    local need stat f o
    if [ "$VARIANT" = pi05 ]; then need="q01 q99"; else need="mean std"; fi
    for f in observation.state:state action:actions; do
        o="${f#*:}" f="${f%%:*}"
        for stat in $need; do
            grep -q "\"$f\.$stat\"" <<<"$STATS_BYTES" \
                || lerobot_die "$STATS_FILE: $VARIANT normalizes by $need, and $o has no $stat"
        done
    done
    echo "openpi-to-pytorch: LeRobot stats from $STATS_FILE (state $STATE_FEATURE_DIM, actions $ACTION_FEATURE_DIM)" >&2
}

# json.dump's layout for a PolicyFeature map: lerobot_features INDENT LEVEL "NAME TYPE DIM..."...
lerobot_features() {
    local unit="$1" level="$2" pad0 pad1 pad2 pad3 first=1 entry name type dims d i
    shift 2
    pad0="$(printf "%$((unit * level))s" "")"; pad1="$(printf "%$((unit * (level + 1)))s" "")"
    pad2="$(printf "%$((unit * (level + 2)))s" "")"; pad3="$(printf "%$((unit * (level + 3)))s" "")"
    printf '{\n'
    for entry in "$@"; do
        read -r name type dims <<<"$entry"
        [ $first = 1 ] || printf ',\n'
        first=0
        printf '%s"%s": {\n%s"type": "%s",\n%s"shape": [\n' "$pad1" "$name" "$pad2" "$type" "$pad2"
        i=0
        for d in $dims; do
            [ $i = 0 ] || printf ',\n'
            printf '%s%s' "$pad3" "$d"; i=$((i + 1))
        done
        printf '\n%s]\n%s}' "$pad2" "$pad1"
    done
    printf '\n%s}' "$pad0"
}

lerobot_write() {
    local inputs=() outputs cam norm tokmax pre_norm_step steps post
    local IFS_SAVE="$IFS"
    IFS=,
    for cam in $CAMERAS; do inputs+=("observation.images.$cam VISUAL 3 224 224"); done
    IFS="$IFS_SAVE"
    inputs+=("observation.state STATE $STATE_FEATURE_DIM")
    outputs=("action ACTION $ACTION_FEATURE_DIM")
    if [ "$VARIANT" = pi05 ]; then norm=QUANTILES tokmax=200 pre_norm_step=2; else norm=MEAN_STD tokmax=48 pre_norm_step=5; fi

    # The normalizer state, once for each pipeline (LeRobot saves the whole dataset_stats in both).
    local pre_state="policy_preprocessor_step_${pre_norm_step}_normalizer_processor.safetensors"
    local post_state="policy_postprocessor_step_0_unnormalizer_processor.safetensors"
    # Written by printf, then through ckpt-read | ckpt-write: checked, and renamed into place whole.
    LEROBOT_TMP="$OUT/.stats.$$.safetensors"
    trap 'rm -f "$LEROBOT_TMP"' EXIT
    printf '%b' "$STATS_BYTES" > "$LEROBOT_TMP"
    "$BIN/ckpt-read" "$LEROBOT_TMP" | "$BIN/ckpt-write" --force --quiet "$OUT/$pre_state"
    "$BIN/ckpt-read" "$LEROBOT_TMP" | "$BIN/ckpt-write" --force --quiet "$OUT/$post_state"
    rm -f "$LEROBOT_TMP"

    # config.json: draccus.dump(PI0Config(...), indent=4); field order is the dataclass's
    # (PreTrainedConfig's fields first). device null: LeRobot picks one when it loads.
    local tok_line=""
    [ "$VARIANT" = pi05 ] && tok_line=$'\n''    "tokenizer_max_length": 200,'
    local tail_tok=""
    [ "$VARIANT" = pi0 ] && tail_tok=$',\n''    "tokenizer_max_length": 48'
    {
        cat <<EOF
{
    "type": "$VARIANT",
    "n_obs_steps": 1,
    "input_features": $(lerobot_features 4 1 "${inputs[@]}"),
    "output_features": $(lerobot_features 4 1 "${outputs[@]}"),
    "device": null,
    "use_amp": false,
    "use_peft": false,
    "push_to_hub": true,
    "repo_id": null,
    "private": null,
    "tags": null,
    "license": null,
    "pretrained_path": null,
    "paligemma_variant": "gemma_2b",
    "action_expert_variant": "gemma_300m",
    "dtype": "$PRECISION",
    "chunk_size": $HORIZON,
    "n_action_steps": $HORIZON,
    "max_state_dim": $MAX_STATE_DIM,
    "max_action_dim": $MAX_ACTION_DIM,
    "num_inference_steps": 10,
    "time_sampling_beta_alpha": 1.5,
    "time_sampling_beta_beta": 1.0,
    "time_sampling_scale": 0.999,
    "time_sampling_offset": 0.001,
    "min_period": 0.004,
    "max_period": 4.0,
    "rtc_config": null,
    "image_resolution": [
        224,
        224
    ],
    "empty_cameras": 0,$tok_line
    "normalization_mapping": {
        "VISUAL": "IDENTITY",
        "STATE": "$norm",
        "ACTION": "$norm"
    },
    "gradient_checkpointing": false,
    "compile_model": false,
    "compile_mode": "max-autotune",
    "freeze_vision_encoder": false,
    "train_expert_only": false,
    "optimizer_lr": 2.5e-05,
    "optimizer_betas": [
        0.9,
        0.95
    ],
    "optimizer_eps": 1e-08,
    "optimizer_weight_decay": 0.01,
    "optimizer_grad_clip_norm": 1.0,
    "scheduler_warmup_steps": 1000,
    "scheduler_decay_steps": 30000,
    "scheduler_decay_lr": 2.5e-06$tail_tok
}
EOF
    } | lerobot_put config.json

    # The processor pipelines (json.dump indent 2), step by step as make_pi0(5)_pre_post_processors
    # lists them; "config" is each step's get_config(), "state_file" where state_dict() is not empty.
    norm_cfg() { # FEATURE-ENTRIES... -> the normalizer's config at indent level 3
        cat <<EOF
{
        "eps": 1e-08,
        "features": $(lerobot_features 2 4 "$@"),
        "norm_map": {
          "VISUAL": "IDENTITY",
          "STATE": "$norm",
          "ACTION": "$norm"
        }
      }
EOF
    }
    local rename='    {
      "registry_name": "rename_observations_processor",
      "config": {
        "rename_map": {}
      }
    }'
    local batch='    {
      "registry_name": "to_batch_processor",
      "config": {}
    }'
    local tokenizer="    {
      \"registry_name\": \"tokenizer_processor\",
      \"config\": {
        \"max_length\": $tokmax,
        \"task_key\": \"task\",
        \"padding_side\": \"right\",
        \"padding\": \"max_length\",
        \"truncation\": true,
        \"tokenizer_name\": \"google/paligemma-3b-pt-224\"
      }
    }"
    local device='    {
      "registry_name": "device_processor",
      "config": {
        "device": "cpu",
        "float_dtype": null
      }
    }'
    local normalizer="    {
      \"registry_name\": \"normalizer_processor\",
      \"config\": $(norm_cfg "${inputs[@]}" "${outputs[@]}"),
      \"state_file\": \"$pre_state\"
    }"
    if [ "$VARIANT" = pi05 ]; then
        steps="$rename,
$batch,
$normalizer,
    {
      \"registry_name\": \"pi05_prepare_state_tokenizer_processor_step\",
      \"config\": {}
    },
$tokenizer,
$device"
    else
        steps="$rename,
$batch,
    {
      \"registry_name\": \"pi0_new_line_processor\",
      \"config\": {}
    },
$tokenizer,
$device,
$normalizer"
    fi
    printf '{\n  "name": "policy_preprocessor",\n  "steps": [\n%s\n  ]\n}\n' "$steps" | lerobot_put policy_preprocessor.json
    post="    {
      \"registry_name\": \"unnormalizer_processor\",
      \"config\": $(norm_cfg "${outputs[@]}"),
      \"state_file\": \"$post_state\"
    },
$device"
    printf '{\n  "name": "policy_postprocessor",\n  "steps": [\n%s\n  ]\n}\n' "$post" | lerobot_put policy_postprocessor.json
    echo "openpi-to-pytorch: wrote the LeRobot $VARIANT policy $OUT: model.safetensors, config.json, policy_preprocessor.json, $pre_state, policy_postprocessor.json, $post_state" >&2
}

# stdin -> OUT/NAME without the final newline (json.dump writes none), under a temporary name.
lerobot_put() {
    local text
    text="$(cat)"
    printf '%s' "$text" > "$OUT/.$1.tmp"
    mv -f "$OUT/.$1.tmp" "$OUT/$1"
}
