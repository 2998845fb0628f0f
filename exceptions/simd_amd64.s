#include "textflag.h"

// COUNTLE sets R10 to how many of the R8 (<= 64) uint16s at ORIGINS(SI)
// are <= AX (clamped to 0xffff). Z0 = the clamped AX in every word; K1,
// K2 = the low R8 bits of a 64-bit mask (BZHI), one 32-word half each;
// the masked loads never touch words at or past R8, so no byte past the
// array is read. It clobbers AX, R9, R11, Z0-Z2 and K1-K4; the caller
// runs VZEROUPPER.
#define COUNTLE(ORIGINS) \
	MOVQ $0xffff, R9 \
	CMPQ AX, R9 \
	CMOVQHI R9, AX \
	VPBROADCASTW AX, Z0 \
	MOVQ $-1, R9 \
	BZHIQ R8, R9, R9 \
	KMOVQ R9, K1 \
	KSHIFTRQ $32, K1, K2 \
	VMOVDQU16.Z ORIGINS(SI), K1, Z1 \
	VMOVDQU16.Z (ORIGINS+64)(SI), K2, Z2 \
	VPCMPUW $2, Z0, Z1, K1, K3 \
	VPCMPUW $2, Z0, Z2, K2, K4 \
	KMOVD K3, R10 \
	KMOVD K4, R11 \
	POPCNTL R10, R10 \
	POPCNTL R11, R11 \
	ADDQ R11, R10

// FIELD sets R9 to the W-bit field (W a register, 0 to 64) at bit AX of
// the block at SI: rawbits in gdir.go. It clobbers AX, CX, DI and R13.
#define FIELD(W) \
	MOVQ AX, R13 \
	SHRQ $6, R13 \
	ANDQ $63, AX \
	MOVQ 0(SI)(R13*8), R9 \
	SHRXQ AX, R9, R9 \
	MOVQ 8(SI)(R13*8), DI \
	ADDQ DI, DI \
	MOVQ $63, CX \
	SUBQ AX, CX \
	SHLXQ CX, DI, DI \
	ORQ DI, R9 \
	BZHIQ W, R9, R9

// PREFETCHN starts loading the line at P and the CNT lines after it
// (PREFETCHT0). It clobbers P and CNT, and uses the labels pnext and
// pdone, so a function can expand it once.
#define PREFETCHN(P, CNT) \
	PREFETCHT0 (P) \
	TESTQ CNT, CNT \
	JZ pdone \
pnext: \
	ADDQ $64, P \
	PREFETCHT0 (P) \
	DECQ CNT \
	JNZ pnext \
pdone:

// func prefetchLines(p unsafe.Pointer, n uintptr)
TEXT ·prefetchLines(SB), NOSPLIT|NOFRAME, $0-16
	MOVQ p+0(FP), AX
	MOVQ n+8(FP), CX
	PREFETCHN(AX, CX)
	RET

// func countLE16(a unsafe.Pointer, n uint, off uint64) uint
TEXT ·countLE16(SB), NOSPLIT|NOFRAME, $0-32
	MOVQ a+0(FP), SI
	MOVQ n+8(FP), R8
	MOVQ off+16(FP), AX
	COUNTLE(0)
	MOVQ R10, ret+24(FP)
	VZEROUPPER
	RET

// func cpuid(eaxArg, ecxArg uint32) (eax, ebx, ecx, edx uint32)
TEXT ·cpuid(SB), NOSPLIT, $0-24
	MOVL eaxArg+0(FP), AX
	MOVL ecxArg+4(FP), CX
	CPUID
	MOVL AX, eax+8(FP)
	MOVL BX, ebx+12(FP)
	MOVL CX, ecx+16(FP)
	MOVL DX, edx+20(FP)
	RET

// func xgetbv() (eax uint32)
TEXT ·xgetbv(SB), NOSPLIT, $0-4
	MOVL $0, CX
	XGETBV
	MOVL AX, eax+0(FP)
	RET

// func lookup16(e0, e1 unsafe.Pointer, before, c uint64) (cow, res uint64)
//
// Lookup's block search for the common block, in one call (see lookup16
// in simd_amd64.go). Registers: SI the entry chosen (e0 if before, else
// e1), then block word 0, BX c then
// its offset, DX the meta word, R8 n, R10 the record, R11 wc, R12 wl.
TEXT ·lookup16(SB), NOSPLIT|NOFRAME, $0-48
	MOVQ e1+8(FP), SI
	MOVQ before+16(FP), AX
	TESTQ AX, AX
	CMOVQNE e0+0(FP), SI
	MOVQ c+24(FP), BX
	MOVQ SI, CX
	ANDQ $7, CX
	ANDQ $-8, SI
	MOVQ SI, DI
	PREFETCHN(DI, CX)
	SUBQ 0(SI), BX // off = c - first origin
	JCS segment
	MOVQ 16(SI), DX
	MOVQ DX, AX
	ANDQ $0xff0000, AX
	CMPQ AX, $0x100000 // wo == 16
	JNE other
	MOVQ DX, R8
	ANDQ $0xffff, R8
	CMPQ R8, $64
	JA other
	MOVQ DX, AX
	SHRQ $40, AX
	CMPQ AX, $64 // all its lines prefetched
	JA other

	// R10 = the last record whose origin offset is <= off: origins are
	// sorted and record 0's is 0, so the count of those <= off, less one.
	MOVQ BX, AX
	COUNTLE(24)
	DECQ R10
	VZEROUPPER

	MOVWQZX 24(SI)(R10*2), AX
	SUBQ AX, BX // d = off - origin offset of record R10
	MOVQ DX, R11
	SHRQ $24, R11
	ANDQ $0xff, R11 // wc
	MOVQ DX, R12
	SHRQ $32, R12
	ANDQ $0xff, R12 // wl

	// Len-1 of record R10: wl bits at 192 + n*(16+wc) + R10*wl. With wl
	// 0 (every run of the block one chunk long) it is 0.
	TESTQ R12, R12
	JNZ length
	TESTQ BX, BX
	JNZ past
	JMP cow
length:
	LEAQ 16(R11), AX
	IMULQ R8, AX
	MOVQ R10, R13
	IMULQ R12, R13
	ADDQ R13, AX
	ADDQ $192, AX
	FIELD(R12)
	CMPQ BX, R9
	JHI past

cow:
	// COW of record R10: cbase + wc bits at 192 + n*16 + R10*wc, + d.
	MOVQ R8, AX
	SHLQ $4, AX
	MOVQ R10, R13
	IMULQ R11, R13
	ADDQ R13, AX
	ADDQ $192, AX
	FIELD(R11)
	ADDQ 8(SI), R9
	ADDQ BX, R9
	MOVQ R9, cow+32(FP)
	MOVQ $1, res+40(FP)
	RET

past:
	// Past record R10's run: not mapped, unless it was the last record
	// (a later block may start in this bucket).
	INCQ R10
	CMPQ R10, R8
	JAE segment
	MOVQ $0, cow+32(FP)
	MOVQ $2, res+40(FP)
	RET

other:
	MOVQ $0, cow+32(FP)
	MOVQ $0, res+40(FP)
	RET

segment:
	MOVQ $0, cow+32(FP)
	MOVQ $3, res+40(FP)
	RET
