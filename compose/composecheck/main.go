// composecheck loads a compose file with compose-spec/compose-go, the loader behind
// `docker compose config` (interpolation, merge, schema validation), for machines without
// Docker. Usage: composecheck FILE WORKDIR  — prints the resolved project, exit 1 on error.
package main

import (
	"context"
	"fmt"
	"os"

	"github.com/compose-spec/compose-go/v2/cli"
)

func main() {
	if len(os.Args) != 3 {
		fmt.Fprintln(os.Stderr, "usage: composecheck FILE WORKDIR")
		os.Exit(2)
	}
	opts, err := cli.NewProjectOptions([]string{os.Args[1]},
		cli.WithWorkingDirectory(os.Args[2]),
		cli.WithEnvFiles(),
		cli.WithDotEnv,
		cli.WithOsEnv,
		cli.WithName("otpgate"),
		cli.WithProfiles([]string{"tools"}),
	)
	if err != nil {
		fmt.Fprintln(os.Stderr, "composecheck:", err)
		os.Exit(1)
	}
	project, err := opts.LoadProject(context.Background())
	if err != nil {
		fmt.Fprintln(os.Stderr, "composecheck:", err)
		os.Exit(1)
	}
	out, err := project.MarshalYAML()
	if err != nil {
		fmt.Fprintln(os.Stderr, "composecheck:", err)
		os.Exit(1)
	}
	fmt.Print(string(out))
}
