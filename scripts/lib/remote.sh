# Remote checkpoints for the recipes (sourced). ckpt-read reads gs://, hf:// and https:// URLs
# itself; a recipe only needs the small files beside the weights (openpi's norm stats), fetched
# here with curl under the same conventions (docs/remote.md): gs://B/O is
# {STORAGE_EMULATOR_HOST or https://storage.googleapis.com}/B/O, hf://ORG/REPO[@REV]/FILE is
# {HF_ENDPOINT or https://huggingface.co}/ORG/REPO/resolve/REV/FILE, tokens from
# GOOGLE_OAUTH_ACCESS_TOKEN / CKPT_GCS_TOKEN and HF_TOKEN.

is_remote() { case "$1" in gs://*|hf://*|https://*|http://*) return 0 ;; *) return 1 ;; esac; }

# remote_fetch URL FILE: the object at URL into FILE; exit 66 when it is not there.
remote_fetch() {
    local url="$1" out="$2" http token="" rest repo rev
    case "$url" in
    gs://*)
        http="${STORAGE_EMULATOR_HOST:-https://storage.googleapis.com}"
        case "$http" in *://*) ;; *) http="http://$http" ;; esac
        http="${http%/}/${url#gs://}"
        token="${GOOGLE_OAUTH_ACCESS_TOKEN:-${CKPT_GCS_TOKEN:-}}" ;;
    hf://*)
        rest="${url#hf://}" repo="$(cut -d/ -f1-2 <<<"$rest")" rest="$(cut -d/ -f3- <<<"$rest")" rev=main
        case "$repo" in *@*) rev="${repo#*@}" repo="${repo%@*}" ;; esac
        http="${HF_ENDPOINT:-https://huggingface.co}"
        http="${http%/}/$repo/resolve/$rev/$rest"
        token="${HF_TOKEN:-}" ;;
    *) http="$url" ;;
    esac
    local auth=()
    [ -z "$token" ] || auth=(-H "Authorization: Bearer $token")
    local code
    code="$(curl -sSL --retry 3 "${auth[@]}" -o "$out" -w '%{http_code}' "$http")" || { echo "recipe: $url: fetch failed" >&2; exit 74; }
    case "$code" in
    2??) ;;
    404) rm -f "$out"; echo "recipe: $url: not found (HTTP 404)" >&2; exit 66 ;;
    *) rm -f "$out"; echo "recipe: $url: HTTP $code" >&2; exit 74 ;;
    esac
}
