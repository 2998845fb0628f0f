package kernel

import "encoding/binary"

// The subset of the FUSE kernel protocol (include/uapi/linux/fuse.h) that a
// server of one regular file needs. Offsets below are byte offsets into the
// structs as the kernel lays them out (native endianness; the kernel refuses
// a byte-swapped INIT, so little-endian amd64/arm64 is all we meet).

const (
	fuseKernelMajor = 7
	// fuseOurMinor is the newest protocol minor this server was written
	// against; we answer INIT with min(kernel's, ours).
	fuseOurMinor = 45
	// fuseMinMinor is the oldest kernel protocol we accept: 7.36 brought
	// INIT's second flags word (flags2). FOPEN_PARALLEL_DIRECT_WRITES came
	// with 7.38 (Linux 6.2): on 7.36 and 7.37 the kernel ignores it and
	// direct writes serialize on the file's lock (INIT logs it).
	fuseMinMinor = 36
	// fuseParallelWritesMinor is the protocol that honours
	// FOPEN_PARALLEL_DIRECT_WRITES.
	fuseParallelWritesMinor = 38

	fuseRootID = 1

	// fuseUniqueResend marks a request the kernel resent after
	// FUSE_NOTIFY_RESEND; the reply must carry the unique unchanged.
	fuseUniqueResend = uint64(1) << 63
)

// Opcodes (enum fuse_opcode).
const (
	opLookup      = 1
	opForget      = 2
	opGetattr     = 3
	opSetattr     = 4
	opOpen        = 14
	opRead        = 15
	opWrite       = 16
	opStatfs      = 17
	opRelease     = 18
	opFsync       = 20
	opFlush       = 25
	opInit        = 26
	opInterrupt   = 36
	opDestroy     = 38
	opBatchForget = 42
	opFallocate   = 43
)

// INIT flags (fuse_init_in.flags, low 32 bits; flags2 holds bits 32..63).
const (
	initAsyncRead = uint64(1) << 0
	initBigWrites = uint64(1) << 5
	initAsyncDIO  = uint64(1) << 15
	initMaxPages  = uint64(1) << 22
	initInitExt   = uint64(1) << 30
	initHasResend = uint64(1) << 39
)

// Open reply flags (fuse_open_out.open_flags).
const (
	fopenDirectIO             = 1 << 0
	fopenNoFlush              = 1 << 5
	fopenParallelDirectWrites = 1 << 6
)

// Notification codes (enum fuse_notify_code), sent as an out header with
// unique 0 and the code in the error field.
const (
	notifyInvalInode = 2
	notifyResend     = 7
)

// setattr valid bits and fallocate modes.
const (
	fattrSize = 1 << 3

	fallocKeepSize  = 0x01
	fallocPunchHole = 0x02
	fallocZeroRange = 0x10
)

// Struct sizes in bytes.
const (
	inHeaderSize   = 40 // fuse_in_header
	outHeaderSize  = 16 // fuse_out_header
	initInSize     = 64 // fuse_init_in (7.36+: flags2 and unused[11])
	initOutSize    = 64 // fuse_init_out
	attrSize       = 88 // fuse_attr
	attrOutSize    = 16 + attrSize
	entryOutSize   = 40 + attrSize
	openOutSize    = 16
	readInSize     = 40
	writeInSize    = 40
	writeOutSize   = 8
	fsyncInSize    = 16
	fallocateInSz  = 32
	setattrInSize  = 88
	statfsOutSize  = 80
	inodeInvalSize = 24
)

const (
	// maxWrite is the largest READ or WRITE payload we negotiate, in bytes:
	// 1 MiB = 256 pages, the kernel's default max_pages limit.
	maxWrite = 1 << 20
	// readBufSize is what each reader hands to read(2) on /dev/fuse: the
	// kernel refuses reads smaller than header + fuse_write_in + max_write.
	readBufSize = maxWrite + 4096
)

var le = binary.LittleEndian

// inHeader is struct fuse_in_header.
type inHeader struct {
	Len    uint32
	Opcode uint32
	Unique uint64
	NodeID uint64
}

func parseInHeader(b []byte) inHeader {
	return inHeader{
		Len:    le.Uint32(b[0:]),
		Opcode: le.Uint32(b[4:]),
		Unique: le.Uint64(b[8:]),
		NodeID: le.Uint64(b[16:]),
	}
}

func putOutHeader(b []byte, length int, errno int32, unique uint64) {
	le.PutUint32(b[0:], uint32(length))
	le.PutUint32(b[4:], uint32(errno))
	le.PutUint64(b[8:], unique)
}

// putAttr fills struct fuse_attr for the one file we serve.
func putAttr(b []byte, size int64, readOnly bool) {
	clear(b[:attrSize])
	mode := uint32(0o100600) // S_IFREG | rw-------
	if readOnly {
		mode = 0o100400
	}
	le.PutUint64(b[0:], fuseRootID)
	le.PutUint64(b[8:], uint64(size))
	le.PutUint64(b[16:], uint64(size+511)/512) // blocks, 512-byte units
	le.PutUint32(b[60:], mode)
	le.PutUint32(b[64:], 1)    // nlink
	le.PutUint32(b[80:], 4096) // blksize
}
