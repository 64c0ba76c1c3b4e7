// Command duet is the two-node high-availability daemon and its CLI.
package main

import (
	"os"

	"github.com/duet-ha/duet/pkg/cli"
)

func main() { os.Exit(cli.Main(cli.Std(), os.Args[1:])) }
