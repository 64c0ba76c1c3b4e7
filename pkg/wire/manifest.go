package wire

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io/fs"
	"sync"

	"github.com/klauspost/compress/zstd"
)

// BlockSize is the default unit of block checksums in manifests: 1 <<
// BlockShift. A resync that compares a few files asks for smaller blocks
// (down to 1 << MinBlockShift, the bitmap's chunk) so that a 4 KiB change
// costs 4 KiB on the wire, not 64 KiB.
const (
	BlockShift    = 16
	BlockSize     = 1 << BlockShift
	MinBlockShift = 12
)

// ValidShift reports whether s names a block size of checksums: 0 (the
// default, BlockShift) or MinBlockShift..BlockShift.
func ValidShift(s uint8) bool {
	return s == 0 || s >= MinBlockShift && s <= BlockShift
}

// SumSize is the size of one block checksum (truncated SHA-256).
const SumSize = 16

// Sum is the checksum of one block.
type Sum [SumSize]byte

// Entry describes one file, directory or other node of a tree.
//
// A full sync holds one per file of both trees: Flags sits beside the
// 32-bit fields, where it takes no word of its own (112 bytes, not 120).
type Entry struct {
	Path   string
	Mode   fs.FileMode // type bits and permissions, as io/fs
	UID    uint32
	GID    uint32
	Flags  EntryFlags
	Size   uint64
	Mtime  int64
	Target string // symlink target
	Rdev   uint64
	Ino    uint64 // local inode: entries sharing it are hard links
	Ctime  int64  // local inode change time (ns)
	Sums   []Sum  // per block of a regular file, when requested
	// Shift: Sums are of blocks of 1 << Shift bytes (0: BlockShift).
	Shift uint8
	// Gen is the local inode's i_generation when Flags has EntryGen (a
	// scan that reads them: fstree.WalkGens). Never sent.
	Gen uint32
}

// SumShift is the block shift of e's checksums (BlockShift when unset).
func (e *Entry) SumShift() uint8 {
	if e.Shift == 0 {
		return BlockShift
	}
	return e.Shift
}

// EntryFlags qualify a manifest entry.
type EntryFlags uint8

// Entry flags.
const (
	// EntryRecent: changed on the sender since the cutoff of the
	// request (its copy's last sync point minus the margin).
	EntryRecent EntryFlags = 1 << 0
	// EntrySummed: Sums were computed (a file of size 0 has none).
	EntrySummed EntryFlags = 1 << 1
	// EntryGen: Gen holds the inode's generation. Local only: cleared
	// when an entry is encoded or decoded.
	EntryGen EntryFlags = 1 << 2
)

// AppendEntry appends the encoding of e to b.
func AppendEntry(b []byte, e *Entry) []byte {
	b = appendString(b, e.Path)
	for _, v := range []uint64{uint64(e.Mode), uint64(e.UID), uint64(e.GID), e.Size, e.Rdev, e.Ino} {
		b = binary.AppendUvarint(b, v)
	}
	b = binary.AppendVarint(b, e.Mtime)
	b = binary.AppendVarint(b, e.Ctime)
	b = append(b, byte(e.Flags&^EntryGen), e.Shift)
	b = appendString(b, e.Target)
	b = binary.AppendUvarint(b, uint64(len(e.Sums)))
	for i := range e.Sums {
		b = append(b, e.Sums[i][:]...)
	}
	return b
}

// MaxManifest bounds a manifest frame's payload once decompressed. The
// answering node cuts frames at 256 KiB of entries, but never splits an
// entry, and a file's checksums take 16 bytes per 64 KiB block: 128 MiB
// for a file of 512 GiB (smaller blocks only within a resync's budget of
// 2^20 sums on each side, replica.fineShifts).
const MaxManifest = 2 * MaxPayload

// MaxManifestEntries bounds the entries of one manifest frame, as
// MaxBatchOps bounds ops: a decoded Entry takes about ten times the 14
// bytes of the smallest encoding. A 4 MiB frame holds at most 4 MiB/14,
// about 300,000.
const MaxManifestEntries = 1 << 19

// DecodeEntries decodes a manifest payload (already decompressed),
// refusing one of more than MaxManifestEntries entries.
func DecodeEntries(b []byte) ([]Entry, error) {
	d := decoder{b: b}
	var out []Entry
	for len(d.b) > 0 {
		if len(out) == MaxManifestEntries {
			return nil, fmt.Errorf("%w: manifest frame of more than %d entries", ErrBadOp, MaxManifestEntries)
		}
		var e Entry
		e.Path = string(d.bytes("path", MaxPath))
		e.Mode = fs.FileMode(d.u32("mode"))
		e.UID = d.u32("uid")
		e.GID = d.u32("gid")
		e.Size = d.uvarint("size")
		e.Rdev = d.uvarint("rdev")
		e.Ino = d.uvarint("ino")
		e.Mtime = d.varint("mtime")
		e.Ctime = d.varint("ctime")
		e.Flags = EntryFlags(d.byte1("flags")) &^ EntryGen
		e.Shift = d.byte1("block shift")
		if d.err == nil && !ValidShift(e.Shift) {
			return nil, fmt.Errorf("%w: manifest entry with checksums of blocks of 1<<%d bytes (%d..%d)", ErrBadOp, e.Shift, MinBlockShift, BlockShift)
		}
		e.Target = string(d.bytes("target", MaxPath))
		n := d.uvarint("sum count")
		if d.err != nil {
			return nil, d.err
		}
		if n > uint64(len(d.b))/SumSize {
			return nil, fmt.Errorf("%w: %d sums, %d bytes left", ErrBadOp, n, len(d.b))
		}
		e.Sums = make([]Sum, n)
		for i := range e.Sums {
			copy(e.Sums[i][:], d.b[:SumSize])
			d.b = d.b[SumSize:]
		}
		if e.Path != "." {
			if err := ValidPath(e.Path); err != nil {
				return nil, fmt.Errorf("%w: manifest entry: %v", ErrBadOp, err)
			}
		}
		out = append(out, e)
	}
	return out, nil
}

// ManifestQuery is a manifest request's payload: which entries get block
// checksums. An empty payload asks for every checksum (verify, a full
// comparison).
type ManifestQuery struct {
	// All: checksums of every regular file.
	All bool
	// Cutoff (ns, the answering node's clock; 0: none): entries whose
	// ctime or mtime is at or after it are flagged EntryRecent and, for
	// regular files, summed.
	Cutoff int64
	// Want lists further paths to sum.
	Want []string
	// WantShift, if not nil, holds the block shift of each Want path's
	// checksums (0: BlockShift), as the requester picked it for its own
	// copy of the file.
	WantShift []uint8
	// Gen is the generation the requester resyncs the copy to; the
	// answering replica records that its copy is being rewritten.
	Gen uint64
	// MovedDirs: the regular files under a directory whose ctime is at
	// or after Cutoff are flagged and summed too, whatever their own
	// times (the directory may have been moved over another: a copy
	// that was the source and rotated a directory the requester never
	// heard of). Encoded as bit 1 of the first byte, bit 0 being All: a
	// replica that predates it reads the byte as All and sums everything
	// (and this build reads a bit it does not know as All too).
	MovedDirs bool
}

// MaxWant bounds the paths a manifest request names: beyond, a requester
// asks for every checksum instead.
const MaxWant = 200000

// AppendManifestQuery encodes q.
func AppendManifestQuery(b []byte, q *ManifestQuery) []byte {
	flags := byte(0)
	if q.All {
		flags |= 1
	}
	if q.MovedDirs {
		flags |= 2
	}
	b = append(b, flags)
	b = binary.AppendVarint(b, q.Cutoff)
	b = binary.AppendUvarint(b, q.Gen)
	b = binary.AppendUvarint(b, uint64(len(q.Want)))
	for i, w := range q.Want {
		b = appendString(b, w)
		var s uint8
		if i < len(q.WantShift) {
			s = q.WantShift[i]
		}
		b = append(b, s)
	}
	return b
}

// DecodeManifestQuery decodes a manifest request payload.
func DecodeManifestQuery(b []byte) (ManifestQuery, error) {
	if len(b) == 0 {
		return ManifestQuery{All: true}, nil
	}
	d := decoder{b: b}
	var q ManifestQuery
	// A flag this build does not know asks for more than these: every
	// checksum, as a build that predates MovedDirs reads it.
	flags := d.byte1("flags")
	q.All, q.MovedDirs = flags&1 != 0 || flags > 3, flags&2 != 0
	q.Cutoff = d.varint("cutoff")
	q.Gen = d.uvarint("gen")
	n := d.uvarint("want count")
	if d.err != nil {
		return q, d.err
	}
	// Checked before the slice is made: each path takes at least 3 bytes
	// (its length, one byte and its block shift), and a string 16 bytes
	// in the slice.
	if n > MaxWant || n > uint64(len(d.b))/3 {
		return q, fmt.Errorf("%w: %d wanted paths (limit %d), %d bytes left", ErrBadOp, n, MaxWant, len(d.b))
	}
	q.Want = make([]string, 0, n)
	q.WantShift = make([]uint8, 0, n)
	for range n {
		w := string(d.bytes("wanted path", MaxPath))
		s := d.byte1("block shift")
		if d.err != nil {
			return q, d.err
		}
		if err := ValidPath(w); err != nil {
			return q, fmt.Errorf("%w: wanted path: %v", ErrBadOp, err)
		}
		if !ValidShift(s) {
			return q, fmt.Errorf("%w: wanted path %q: checksums of blocks of 1<<%d bytes (%d..%d)", ErrBadOp, w, s, MinBlockShift, BlockShift)
		}
		q.Want = append(q.Want, w)
		q.WantShift = append(q.WantShift, s)
	}
	if len(d.b) != 0 {
		return q, fmt.Errorf("%w: %d bytes after the manifest request", ErrBadOp, len(d.b))
	}
	return q, nil
}

// ResyncDone is the payload of a sync frame flagged FlagResyncDone.
type ResyncDone struct {
	Gen    uint64 // the generation the replica's copy now follows
	Report []byte // what the resync discarded from the replica's copy (text, may be empty)
}

// AppendResyncDone encodes r.
func AppendResyncDone(b []byte, r *ResyncDone) []byte {
	b = binary.LittleEndian.AppendUint64(b, r.Gen)
	return append(b, r.Report...)
}

// DecodeResyncDone decodes a resync-done payload.
func DecodeResyncDone(b []byte) (ResyncDone, error) {
	if len(b) < 8 {
		return ResyncDone{}, fmt.Errorf("%w: resync-done payload of %d bytes", ErrBadFrame, len(b))
	}
	return ResyncDone{Gen: binary.LittleEndian.Uint64(b), Report: b[8:]}, nil
}

var (
	encOnce  sync.Once
	enc      *zstd.Encoder
	dec      *zstd.Decoder // up to MaxManifest
	decBatch *zstd.Decoder // up to MaxBatch
)

func codecs() {
	encOnce.Do(func() {
		var err error
		// A 1 MiB window: the encoder keeps a history sized by its
		// window whatever it compresses (8 MiB with the default window,
		// the largest thing on a steady daemon's heap, docs/SCALE.md;
		// 2 MiB with this one).
		// On this repository's sources in 4 MiB batches the output
		// grew by 0.007 % (0.2932 → 0.2934 of the input).
		enc, err = zstd.NewWriter(nil, zstd.WithEncoderLevel(zstd.SpeedFastest), zstd.WithEncoderConcurrency(1), zstd.WithWindowSize(1<<20))
		if err != nil {
			panic(err) // only on invalid options
		}
		// The limit stops the decoding, not only its result: a few
		// kilobytes of zstd can claim gigabytes.
		dec, err = zstd.NewReader(nil, zstd.WithDecoderConcurrency(0), zstd.WithDecoderMaxMemory(MaxManifest))
		if err != nil {
			panic(err)
		}
		decBatch, err = zstd.NewReader(nil, zstd.WithDecoderConcurrency(0), zstd.WithDecoderMaxMemory(MaxBatch))
		if err != nil {
			panic(err)
		}
	})
}

// Compress appends the zstd compression of src to dst.
func Compress(dst, src []byte) []byte {
	codecs()
	return enc.EncodeAll(src, dst)
}

// Decompress decodes a zstd payload, refusing output over MaxManifest.
func Decompress(dst, src []byte) ([]byte, error) {
	codecs()
	return decompress(dec, MaxManifest, dst, src)
}

func decompress(d *zstd.Decoder, limit int, dst, src []byte) ([]byte, error) {
	out, err := d.DecodeAll(src, dst[:0])
	if errors.Is(err, zstd.ErrDecoderSizeExceeded) || errors.Is(err, zstd.ErrWindowSizeExceeded) {
		return nil, fmt.Errorf("%w: zstd payload decompresses to more than %d bytes", ErrBadFrame, limit)
	}
	if err != nil {
		return nil, fmt.Errorf("%w: zstd: %v", ErrBadFrame, err)
	}
	return out, nil
}

// Payload returns a frame's payload, decompressed when flagged: a batch
// to at most MaxBatch bytes, any other frame to at most MaxManifest.
func Payload(f *Frame, scratch []byte) ([]byte, error) {
	if f.Flags&FlagZstd == 0 {
		return f.Payload, nil
	}
	if f.Type == TypeBatch {
		codecs()
		return decompress(decBatch, MaxBatch, scratch, f.Payload)
	}
	return Decompress(scratch, f.Payload)
}
