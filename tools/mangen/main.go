// Command mangen writes the man pages of duet and of each of its commands
// (duet.1, duet-status.1, …) into a directory with cobra's generator, from
// the same commands and help texts as the binary: `make package` installs
// them. SOURCE_DATE_EPOCH, if set, dates them (reproducible builds).
//
//	mangen -version V DIR
package main

import (
	"flag"
	"fmt"
	"os"

	"github.com/duet-ha/duet/pkg/cli"
	"github.com/spf13/cobra/doc"
)

func main() {
	version := flag.String("version", "", "the version the pages document (their footer)")
	flag.Parse()
	if flag.NArg() != 1 {
		fmt.Fprintln(os.Stderr, "usage: mangen -version V DIR")
		os.Exit(2)
	}
	dir := flag.Arg(0)
	root := cli.New(cli.Std())
	// cobra adds its completion command when the binary runs (Execute):
	// add it here too, so that duet-completion.1 documents it.
	root.InitDefaultCompletionCmd()
	root.DisableAutoGenTag = true
	if err := os.MkdirAll(dir, 0o755); err != nil {
		fmt.Fprintln(os.Stderr, "mangen:", err)
		os.Exit(1)
	}
	header := &doc.GenManHeader{Section: "1", Source: "duet " + *version, Manual: "duet manual"}
	if err := doc.GenManTree(root, header, dir); err != nil {
		fmt.Fprintf(os.Stderr, "mangen: writing the man pages into %s: %v\n", dir, err)
		os.Exit(1)
	}
}
