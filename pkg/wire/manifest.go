package wire

import (
	"encoding/binary"
	"fmt"
	"io/fs"
	"sync"

	"github.com/klauspost/compress/zstd"
)

// BlockSize is the unit of block checksums in manifests.
const BlockSize = 64 << 10

// SumSize is the size of one block checksum (truncated SHA-256).
const SumSize = 16

// Sum is the checksum of one block.
type Sum [SumSize]byte

// Entry describes one file, directory or other node of a tree.
type Entry struct {
	Path   string
	Mode   fs.FileMode // type bits and permissions, as io/fs
	UID    uint32
	GID    uint32
	Size   uint64
	Mtime  int64
	Target string // symlink target
	Rdev   uint64
	Ino    uint64 // local inode: entries sharing it are hard links
	Sums   []Sum  // per BlockSize block of a regular file, when requested
}

// AppendEntry appends the encoding of e to b.
func AppendEntry(b []byte, e *Entry) []byte {
	b = appendString(b, e.Path)
	for _, v := range []uint64{uint64(e.Mode), uint64(e.UID), uint64(e.GID), e.Size, e.Rdev, e.Ino} {
		b = binary.AppendUvarint(b, v)
	}
	b = binary.AppendVarint(b, e.Mtime)
	b = appendString(b, e.Target)
	b = binary.AppendUvarint(b, uint64(len(e.Sums)))
	for i := range e.Sums {
		b = append(b, e.Sums[i][:]...)
	}
	return b
}

// DecodeEntries decodes a manifest payload (already decompressed).
func DecodeEntries(b []byte) ([]Entry, error) {
	d := decoder{b: b}
	var out []Entry
	for len(d.b) > 0 {
		var e Entry
		e.Path = string(d.bytes("path", MaxPath))
		e.Mode = fs.FileMode(d.u32("mode"))
		e.UID = d.u32("uid")
		e.GID = d.u32("gid")
		e.Size = d.uvarint("size")
		e.Rdev = d.uvarint("rdev")
		e.Ino = d.uvarint("ino")
		e.Mtime = d.varint("mtime")
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

var (
	encOnce sync.Once
	enc     *zstd.Encoder
	dec     *zstd.Decoder
)

func codecs() {
	encOnce.Do(func() {
		var err error
		enc, err = zstd.NewWriter(nil, zstd.WithEncoderLevel(zstd.SpeedFastest), zstd.WithEncoderConcurrency(1))
		if err != nil {
			panic(err) // only on invalid options
		}
		dec, err = zstd.NewReader(nil, zstd.WithDecoderConcurrency(0), zstd.WithDecoderMaxMemory(2*MaxPayload))
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

// Decompress decodes a zstd payload, refusing output over 2×MaxPayload.
func Decompress(dst, src []byte) ([]byte, error) {
	codecs()
	out, err := dec.DecodeAll(src, dst[:0])
	if err != nil {
		return nil, fmt.Errorf("%w: zstd: %v", ErrBadFrame, err)
	}
	return out, nil
}

// Payload returns a frame's payload, decompressed when flagged.
func Payload(f *Frame, scratch []byte) ([]byte, error) {
	if f.Flags&FlagZstd == 0 {
		return f.Payload, nil
	}
	return Decompress(scratch, f.Payload)
}
