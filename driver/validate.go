package driver

import (
	"errors"
	"strconv"
	"strings"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"github.com/csi-snap/csi-snap/driver/kernel"
	"google.golang.org/grpc/codes"
)

// Supported filesystems for mount access; the first is the default.
var supportedFSTypes = []string{"ext4", "xfs"}

const (
	paramFSType  = "csi.storage.k8s.io/fstype"
	paramCSIPref = "csi.storage.k8s.io/" // metadata the sidecars add; accepted and ignored
	// ParamChunkSize is the StorageClass parameter that sets a volume's
	// copy-on-write chunk size (see parseChunkSize for its forms). It is also
	// the volume_context key under which a volume reports its chunk size.
	ParamChunkSize = "chunkSize"
)

// checkName validates a CSI object name: required, at most 128 bytes, and
// none of the characters the spec bans (U+0000-U+0008, U+000B, U+000C,
// U+000E-U+001F, U+007F-U+009F). Tab, line feed and carriage return are
// allowed, as the spec says ("commonly used whitespace"). Names are only
// ever compared and stored as labels (nameLabel), never used as paths.
func checkName(name string) error {
	if name == "" {
		return statusf(codes.InvalidArgument, "name is required")
	}
	if len(name) > maxStringBytes {
		return statusf(codes.InvalidArgument, "name is %d bytes, the limit is %d", len(name), maxStringBytes)
	}
	if i := strings.IndexFunc(name, func(r rune) bool {
		return r < 0x20 && r != '\t' && r != '\n' && r != '\r' || r >= 0x7f && r <= 0x9f
	}); i >= 0 {
		return statusf(codes.InvalidArgument, "name %q holds control character %#02x", name, name[i])
	}
	return nil
}

// nameLabel is how a name is kept in a label: the store's labels are text
// without ASCII control bytes (cow's FORMAT.md), so a name holding one of
// the whitespace characters checkName lets through is kept Go-quoted
// under key+"-quoted" instead; others are kept as they are, as always.
func nameLabel(key, name string) (string, string) {
	if strings.ContainsAny(name, "\t\n\r") {
		return key + "-quoted", strconv.Quote(name)
	}
	return key, name
}

// hasName reports whether labels carry name under key (see nameLabel).
func hasName(labels map[string]string, key, name string) bool {
	k, v := nameLabel(key, name)
	return labels[k] == v
}

func supportedFS(fs string) bool {
	for _, f := range supportedFSTypes {
		if f == fs {
			return true
		}
	}
	return false
}

// checkCapability validates one volume capability: an access type (mount or
// block) is required, the filesystem must be one we make, and the access mode
// must be a single-node one (volumes are local to their node).
func checkCapability(c *csi.VolumeCapability) error {
	return checkCapabilityAs(c, codes.InvalidArgument)
}

// checkNodeCapability is checkCapability for NodeStageVolume and
// NodePublishVolume: a well-formed capability the volume does not support
// (another filesystem, a MULTI_NODE_ mode) is the spec's "Exceeds
// capabilities" case of those RPCs, FAILED_PRECONDITION; a malformed one
// stays INVALID_ARGUMENT.
func checkNodeCapability(c *csi.VolumeCapability) error {
	return checkCapabilityAs(c, codes.FailedPrecondition)
}

// checkCapabilityAs is checkCapability answering unsupported (an fs_type or
// access mode csi-snap does not serve) with the code given.
func checkCapabilityAs(c *csi.VolumeCapability, unsupported codes.Code) error {
	if c == nil {
		return statusf(codes.InvalidArgument, "volume capability is required")
	}
	switch at := c.GetAccessType().(type) {
	case *csi.VolumeCapability_Mount:
		if fs := at.Mount.GetFsType(); fs != "" && !supportedFS(fs) {
			return statusf(unsupported, "fs_type %q is not supported (want one of %v)", fs, supportedFSTypes)
		}
		for _, f := range at.Mount.GetMountFlags() {
			// Each option either fails the mount or makes it no mount of
			// the volume's filesystem (a "loop" option, say, mounts a
			// loop device of mount(8)'s own over the volume's: never
			// unstaged, the volume never detached); and the fuse-holder
			// runs no mount line with one, so the plugin would run it
			// itself. So they are refused here, before anything is made
			// (control characters and white space among them).
			for _, o := range strings.Split(f, ",") {
				if why := kernel.MountOptionRefused(o); why != "" {
					return statusf(codes.InvalidArgument, "mount flag %q: option %q %s", f, o, why)
				}
			}
		}
	case *csi.VolumeCapability_Block:
	default:
		return statusf(codes.InvalidArgument, "volume capability needs an access type (mount or block)")
	}
	if c.GetAccessMode() == nil {
		return statusf(codes.InvalidArgument, "volume capability needs an access mode")
	}
	switch m := c.GetAccessMode().GetMode(); m {
	case csi.VolumeCapability_AccessMode_SINGLE_NODE_WRITER,
		csi.VolumeCapability_AccessMode_SINGLE_NODE_READER_ONLY,
		csi.VolumeCapability_AccessMode_SINGLE_NODE_SINGLE_WRITER,
		csi.VolumeCapability_AccessMode_SINGLE_NODE_MULTI_WRITER:
	default:
		if _, known := csi.VolumeCapability_AccessMode_Mode_name[int32(m)]; !known || m == csi.VolumeCapability_AccessMode_UNKNOWN {
			return statusf(codes.InvalidArgument, "access mode %v is not supported: volumes are local to one node", m)
		}
		return statusf(unsupported, "access mode %v is not supported: volumes are local to one node", m)
	}
	return nil
}

// checkFSFlags refuses (InvalidArgument) a CreateVolume whose mount
// capabilities carry a mount flag that the filesystem the volume will hold
// refuses, as this node's kernel answers it (kernel.CheckFSOptions; the
// plugin that creates a volume is the one on the node that stages it):
// every stage of it would fail, so the claim stays Pending with the reason
// in its events instead of a pod waiting in ContainerCreating. The
// filesystem is the one asked for; else the source's (a restore or clone
// holds it); else, with no source, the default a blank volume is formatted
// with. A source whose filesystem is not recorded is not checked here (its
// stage checks the one it finds).
func checkFSFlags(cs []*csi.VolumeCapability, asked, srcFS string, hasSource bool) error {
	fs := asked
	if fs == "" {
		fs = srcFS
	}
	if fs == "" && !hasSource {
		fs = supportedFSTypes[0]
	}
	if fs == "" {
		return nil
	}
	for _, c := range cs {
		if m := c.GetMount(); m != nil && len(m.GetMountFlags()) > 0 {
			if err := kernel.CheckFSOptions(fs, "", splitOptions(m.GetMountFlags())); err != nil {
				return statusf(codes.InvalidArgument, "%v: no stage of the volume could mount it", err)
			}
		}
	}
	return nil
}

func checkCapabilities(cs []*csi.VolumeCapability) error {
	if len(cs) == 0 {
		return statusf(codes.InvalidArgument, "volume capabilities are required")
	}
	for _, c := range cs {
		if err := checkCapability(c); err != nil {
			return err
		}
	}
	return nil
}

// volumeParams are the CreateVolume parameters we understand.
type volumeParams struct {
	fsType    string // "" when not given
	chunkSize int    // bytes; 0 when not given (the engine chooses)
}

// checkVolumeParams accepts only the parameters we understand and returns
// what they ask for. Any bad value is InvalidArgument naming the parameter.
func checkVolumeParams(p map[string]string) (volumeParams, error) {
	var out volumeParams
	for k, v := range p {
		switch {
		case k == paramFSType:
			if v != "" && !supportedFS(v) {
				return volumeParams{}, statusf(codes.InvalidArgument, "parameter %s=%q: want one of %v", k, v, supportedFSTypes)
			}
			out.fsType = v
		case k == ParamChunkSize:
			cs, err := parseChunkSize(v)
			if err != nil {
				return volumeParams{}, statusf(codes.InvalidArgument, "parameter %s=%q: %v; want a power of two from 4Ki (%d) to 1Mi (%d) bytes, "+
					"as a plain byte count or with a binary suffix Ki or Mi (e.g. 16Ki, 64Ki, 1Mi)", k, v, err, MinChunkSize, MaxChunkSize)
			}
			out.chunkSize = cs
		case strings.HasPrefix(k, paramCSIPref):
		default:
			return volumeParams{}, statusf(codes.InvalidArgument, "unknown parameter %q", k)
		}
	}
	return out, nil
}

// binarySuffixes are the suffixes parseChunkSize accepts, as in a Kubernetes
// quantity (Gi only so that "1Gi" is answered "above the maximum").
var binarySuffixes = []struct {
	suffix string
	mult   int64
}{{"Ki", 1 << 10}, {"Mi", 1 << 20}, {"Gi", 1 << 30}}

// parseChunkSize reads a chunk size in bytes: "" (not given: 0), a decimal
// integer ("65536"), or a decimal integer with a binary suffix Ki, Mi or Gi
// ("64Ki", "1Mi"). No sign, spaces, fraction, exponent or decimal suffix
// (k, M: no multiple of 1000 is a power of two). The value must be a power
// of two in [MinChunkSize, MaxChunkSize]. The error says what is wrong,
// without the parameter's name (the caller adds it).
func parseChunkSize(v string) (int, error) {
	if v == "" {
		return 0, nil
	}
	num, mult := v, int64(1)
	for _, s := range binarySuffixes {
		if strings.HasSuffix(v, s.suffix) {
			num, mult = strings.TrimSuffix(v, s.suffix), s.mult
			break
		}
	}
	if num == "" || strings.Trim(num, "0123456789") != "" {
		return 0, errors.New("not a byte count")
	}
	n, err := strconv.ParseInt(num, 10, 64)
	if err != nil || n > MaxChunkSize/mult {
		// Only a number too large for int64 fails to parse here.
		return 0, errors.New("above the maximum")
	}
	n *= mult
	switch {
	case n < MinChunkSize:
		return 0, errors.New("below the minimum")
	case n > MaxChunkSize:
		return 0, errors.New("above the maximum")
	case n&(n-1) != 0:
		return 0, errors.New("not a power of two")
	}
	return int(n), nil
}

// checkSnapshotParams accepts only the sidecars' metadata parameters.
func checkSnapshotParams(p map[string]string) error {
	for k := range p {
		if !strings.HasPrefix(k, paramCSIPref) {
			return statusf(codes.InvalidArgument, "unknown parameter %q", k)
		}
	}
	return nil
}

// checkTopology answers ResourceExhausted when the requisite topologies
// exclude this node: we can only create volumes where the call is served.
func (d *Driver) checkTopology(r *csi.TopologyRequirement) error {
	if r == nil || len(r.GetRequisite()) == 0 {
		return nil
	}
	for _, t := range r.GetRequisite() {
		if d.topologyMatches(t) {
			return nil
		}
	}
	return statusf(codes.ResourceExhausted, "requisite topology excludes node %q: volumes are created only on the node serving the call", d.opt.NodeID)
}

// topologyMatches reports whether t names this node. We publish a single
// segment key, so a topology without it was not built from what we reported
// and cannot be satisfied.
func (d *Driver) topologyMatches(t *csi.Topology) bool {
	v, ok := t.GetSegments()[TopologyKey]
	return ok && v == d.topo
}

func (d *Driver) topology() []*csi.Topology {
	return []*csi.Topology{{Segments: map[string]string{TopologyKey: d.topo}}}
}
