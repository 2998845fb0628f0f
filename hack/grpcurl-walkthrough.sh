#!/usr/bin/env bash
# The README's grpcurl walkthrough, runnable: starts csi-snap on a temporary
# socket and data dir, creates a volume, publishes it (ext4), writes a file,
# snapshots it, overwrites the file, restores the snapshot into a new volume
# and reads the old content back, then cleans everything up. Needs root,
# grpcurl (go install github.com/fullstorydev/grpcurl/cmd/grpcurl@v1.9.4)
# and e2fsprogs.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PATH:/usr/local/go/bin"
export PATH="$PATH:$(go env GOPATH)/bin"
work=$(mktemp -d /tmp/csi-snap-walk.XXXXXX)
sock=$work/csi.sock
go build -o "$work/csi-snap" ./cmd/csi-snap
"$work/csi-snap" --endpoint "unix://$sock" --data-dir "$work/data" --node-id demo-node >"$work/csi-snap.log" 2>&1 &
pid=$!
vol= restored= snap= done=
# On a failure, undo what the walkthrough did while csi-snap still runs:
# killing it leaves its volumes attached (they outlive the plugin, held by
# its fuse-holder), and rm -rf of a work dir with them mounted would empty
# the volumes and then hang on the FUSE mount of the dead server.
cleanup() {
	set +e
	if [ -z "$done" ]; then
		for v in "$restored:$work/staging2:$work/target2" "$vol:$work/staging:$work/target"; do
			IFS=: read -r id st tg <<<"$v"
			[ -n "$id" ] || continue
			grpcurl -plaintext -unix -d '{"volumeId":"'"$id"'","targetPath":"'"$tg"'"}' "$sock" csi.v1.Node/NodeUnpublishVolume >/dev/null
			grpcurl -plaintext -unix -d '{"volumeId":"'"$id"'","stagingTargetPath":"'"$st"'"}' "$sock" csi.v1.Node/NodeUnstageVolume >/dev/null
			grpcurl -plaintext -unix -d '{"volumeId":"'"$id"'"}' "$sock" csi.v1.Controller/DeleteVolume >/dev/null
		done
		[ -z "$snap" ] || grpcurl -plaintext -unix -d '{"snapshotId":"'"$snap"'"}' "$sock" csi.v1.Controller/DeleteSnapshot >/dev/null
	fi
	kill "$pid" 2>/dev/null; wait "$pid" 2>/dev/null
	if grep -q " $work/" /proc/self/mountinfo; then
		echo "still mounted under $work (not removed):"; grep " $work/" /proc/self/mountinfo | cut -d' ' -f5
	else
		rm -rf "$work"
	fi
}
trap cleanup EXIT
for _ in $(seq 100); do [ -S "$sock" ] && break; sleep 0.1; done

say() { printf '\n$ %s\n' "$*"; }
csi() { # method json
	say "grpcurl -plaintext -unix -d '$2' $sock $1"
	grpcurl -plaintext -unix -d "$2" "$sock" "$1"
}
field() { sed -n "s/.*\"$1\": \"\\([^\"]*\\)\".*/\\1/p" | head -1; }
MOUNT='{"mount":{"fsType":"ext4"},"accessMode":{"mode":"SINGLE_NODE_WRITER"}}'

say "grpcurl -plaintext -unix $sock list"
grpcurl -plaintext -unix "$sock" list
csi csi.v1.Identity/GetPluginInfo '{}'

out=$(csi csi.v1.Controller/CreateVolume '{"name":"demo","capacityRange":{"requiredBytes":268435456},"volumeCapabilities":['"$MOUNT"']}')
echo "$out"; vol=$(echo "$out" | field volumeId)
mkdir -p "$work/staging" "$work/staging2"
csi csi.v1.Node/NodeStageVolume '{"volumeId":"'"$vol"'","stagingTargetPath":"'"$work/staging"'","volumeCapability":'"$MOUNT"'}'
csi csi.v1.Node/NodePublishVolume '{"volumeId":"'"$vol"'","stagingTargetPath":"'"$work/staging"'","targetPath":"'"$work/target"'","volumeCapability":'"$MOUNT"'}'
say "echo 'hello from before the snapshot' > $work/target/hello.txt && sync"
echo 'hello from before the snapshot' >"$work/target/hello.txt"; sync -f "$work/target/hello.txt"

out=$(csi csi.v1.Controller/CreateSnapshot '{"name":"demo-snap","sourceVolumeId":"'"$vol"'"}')
echo "$out"; snap=$(echo "$out" | field snapshotId)
say "echo 'changed after the snapshot' > $work/target/hello.txt"
echo 'changed after the snapshot' >"$work/target/hello.txt"; sync -f "$work/target/hello.txt"

out=$(csi csi.v1.Controller/CreateVolume '{"name":"demo-restore","volumeCapabilities":['"$MOUNT"'],"volumeContentSource":{"snapshot":{"snapshotId":"'"$snap"'"}}}')
echo "$out"; restored=$(echo "$out" | field volumeId)
csi csi.v1.Node/NodeStageVolume '{"volumeId":"'"$restored"'","stagingTargetPath":"'"$work/staging2"'","volumeCapability":'"$MOUNT"'}'
csi csi.v1.Node/NodePublishVolume '{"volumeId":"'"$restored"'","stagingTargetPath":"'"$work/staging2"'","targetPath":"'"$work/target2"'","volumeCapability":'"$MOUNT"',"readonly":true}'
say "cat $work/target/hello.txt $work/target2/hello.txt"
cat "$work/target/hello.txt" "$work/target2/hello.txt"
[ "$(cat "$work/target2/hello.txt")" = 'hello from before the snapshot' ] || { echo "restore holds the wrong content"; exit 1; }

csi csi.v1.Controller/ListSnapshots '{"sourceVolumeId":"'"$vol"'"}'
for v in "$vol:$work/staging:$work/target" "$restored:$work/staging2:$work/target2"; do
	IFS=: read -r id st tg <<<"$v"
	csi csi.v1.Node/NodeUnpublishVolume '{"volumeId":"'"$id"'","targetPath":"'"$tg"'"}'
	csi csi.v1.Node/NodeUnstageVolume '{"volumeId":"'"$id"'","stagingTargetPath":"'"$st"'"}'
	csi csi.v1.Controller/DeleteVolume '{"volumeId":"'"$id"'"}'
done
csi csi.v1.Controller/DeleteSnapshot '{"snapshotId":"'"$snap"'"}'
done=1
echo; echo "walkthrough OK"
