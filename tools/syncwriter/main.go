// Command syncwriter appends numbered 16-byte records to a file, making
// each durable before the next, and prints the number of every record
// whose durability call returned success. It stops at the first failure.
// The zero-loss tests run it under `duet exec` and check that every
// printed number is on the peer.
//
// With -timing each line also carries how long that record's write and
// durability call took, in microseconds: the longest stall a writer saw.
//
// Modes: fdatasync (write, then fdatasync), dsync (the file is opened with
// O_DSYNC: write(2) itself is the durability point), msync (records are
// stored into a shared mapping of the file, then msync(MS_SYNC)).
//
// -burst N writes N records, one write(2) each, before each fdatasync: a
// burst of capture records that can overflow a small ring buffer. With
// -freeze-pid the writer stops that process (SIGSTOP: the primary's
// daemon) the moment its first durability call returns, and exits: what
// the peer holds then is exactly what the call was allowed to promise.
package main

import (
	"bufio"
	"flag"
	"fmt"
	"os"
	"time"

	"golang.org/x/sys/unix"
)

const recordSize = 16

// mapBytes is the file size in msync mode: the records it can hold.
const mapBytes = 16 << 20

func main() {
	file := flag.String("file", "", "file to append to")
	max := flag.Int("max", 1<<30, "stop after this many records")
	mode := flag.String("mode", "fdatasync", "fdatasync, dsync or msync")
	timing := flag.Bool("timing", false, "print each record's write+sync time (µs) after its number")
	burst := flag.Int("burst", 1, "fdatasync mode: records written (one write each) before each fdatasync")
	stride := flag.Int64("stride", 0, "fdatasync mode: write record i at offset (i-1)*stride (each in its own 64 KiB chunk with 65536: one capture record per write) instead of appending")
	freeze := flag.Int("freeze-pid", 0, "SIGSTOP this process as soon as the first durability call returned, and exit")
	flag.Parse()
	out := bufio.NewWriter(os.Stdout)
	start := time.Now()
	acked := func(i int) {
		if *timing {
			fmt.Fprintln(out, i, time.Since(start).Microseconds())
		} else {
			fmt.Fprintln(out, i)
		}
		out.Flush()
		start = time.Now()
	}
	// freezeAt stops the process first, then says record i was
	// acknowledged: the stop comes the moment the call returned.
	freezeAt := func(i int) {
		err := unix.Kill(*freeze, unix.SIGSTOP)
		fmt.Fprintln(out, i)
		out.Flush()
		if err != nil {
			fmt.Fprintf(os.Stderr, "syncwriter: stopping process %d: %v\n", *freeze, err)
			os.Exit(2)
		}
		os.Exit(0)
	}
	die := func(code int, format string, a ...any) {
		out.Flush()
		fmt.Fprintf(os.Stderr, "syncwriter: "+format+"\n", a...)
		os.Exit(code)
	}
	if *burst < 1 || (*burst > 1 && *mode != "fdatasync") {
		die(2, "-burst %d: a positive number, with -mode fdatasync only", *burst)
	}
	if *stride < 0 || (*stride > 0 && (*mode != "fdatasync" || *stride < recordSize)) {
		die(2, "-stride %d: at least %d, with -mode fdatasync only", *stride, recordSize)
	}
	record := func(i int) []byte { return []byte(fmt.Sprintf("%015d\n", i)) }
	switch *mode {
	case "fdatasync", "dsync":
		flags := os.O_WRONLY | os.O_CREATE
		if *stride == 0 {
			flags |= os.O_APPEND
		}
		if *mode == "dsync" {
			flags |= unix.O_DSYNC
		}
		f, err := os.OpenFile(*file, flags, 0o644)
		if err != nil {
			die(2, "%v", err)
		}
		for i := 1; i <= *max; i++ {
			var err error
			if *stride > 0 {
				_, err = f.WriteAt(record(i), int64(i-1)**stride)
			} else {
				_, err = f.Write(record(i))
			}
			if err != nil {
				die(1, "write of record %d: %v", i, err)
			}
			if *mode == "fdatasync" {
				if i%*burst != 0 && i != *max {
					continue
				}
				if err := unix.Fdatasync(int(f.Fd())); err != nil {
					die(1, "fdatasync of record %d: %v", i, err)
				}
			}
			if *freeze != 0 {
				freezeAt(i)
			}
			acked(i)
		}
	case "msync":
		f, err := os.OpenFile(*file, os.O_RDWR|os.O_CREATE|os.O_TRUNC, 0o644)
		if err != nil {
			die(2, "%v", err)
		}
		if err := f.Truncate(mapBytes); err != nil {
			die(2, "%v", err)
		}
		m, err := unix.Mmap(int(f.Fd()), 0, mapBytes, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
		if err != nil {
			die(2, "mmap: %v", err)
		}
		for i := 1; i <= *max && i*recordSize <= mapBytes; i++ {
			off := (i - 1) * recordSize
			copy(m[off:], record(i))
			page := off &^ 4095
			if err := unix.Msync(m[page:page+4096], unix.MS_SYNC); err != nil {
				die(1, "msync of record %d: %v", i, err)
			}
			acked(i)
		}
	default:
		die(2, "unknown -mode %q (fdatasync, dsync or msync)", *mode)
	}
}
