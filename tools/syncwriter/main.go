// Command syncwriter appends numbered 16-byte records to a file, calling
// fdatasync after each, and prints the number of every record whose
// fdatasync returned success. It stops at the first failure. The zero-loss
// tests run it under `duet exec` and check that every printed number is on
// the peer.
package main

import (
	"bufio"
	"flag"
	"fmt"
	"os"

	"golang.org/x/sys/unix"
)

func main() {
	file := flag.String("file", "", "file to append to")
	max := flag.Int("max", 1<<30, "stop after this many records")
	flag.Parse()
	f, err := os.OpenFile(*file, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o644)
	if err != nil {
		fmt.Fprintln(os.Stderr, "syncwriter:", err)
		os.Exit(2)
	}
	out := bufio.NewWriter(os.Stdout)
	for i := 1; i <= *max; i++ {
		if _, err := fmt.Fprintf(f, "%015d\n", i); err != nil {
			fmt.Fprintln(os.Stderr, "syncwriter: write:", err)
			os.Exit(1)
		}
		if err := unix.Fdatasync(int(f.Fd())); err != nil {
			out.Flush()
			fmt.Fprintf(os.Stderr, "syncwriter: fdatasync of record %d: %v\n", i, err)
			os.Exit(1)
		}
		fmt.Fprintln(out, i)
		out.Flush()
	}
}
