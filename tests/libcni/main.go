// tern-libcni: runs one CNI network list (a .conflist) through libcni, the
// library containerd, CRI-O and podman's CNI backend call plugins with, so
// the tests exercise chaining exactly as a runtime does: each plugin gets
// the list's name and cniVersion, its declared capabilities' runtimeConfig,
// and the previous plugin's result; CHECK and DEL get the cached result.
//
// Usage: tern-libcni add|check|del CONFLIST CONTAINER_ID NETNS IFNAME [CAPABILITY_ARGS_JSON]
//
// Plugins are looked up in CNI_PATH (colon-separated); results are cached
// under TERN_LIBCNI_CACHE. ADD prints the chain's final result as JSON.
// Any failure is printed to stderr with exit status 1.
package main

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"

	"github.com/containernetworking/cni/libcni"
)

func main() {
	if err := run(os.Args[1:]); err != nil {
		fmt.Fprintln(os.Stderr, "tern-libcni:", err)
		os.Exit(1)
	}
}

func run(args []string) error {
	if len(args) != 5 && len(args) != 6 {
		return fmt.Errorf("usage: tern-libcni add|check|del CONFLIST CONTAINER_ID NETNS IFNAME [CAPABILITY_ARGS_JSON]")
	}
	cacheDir := os.Getenv("TERN_LIBCNI_CACHE")
	if cacheDir == "" {
		return fmt.Errorf("TERN_LIBCNI_CACHE is not set")
	}
	list, err := libcni.ConfListFromFile(args[1])
	if err != nil {
		return err
	}
	rt := &libcni.RuntimeConf{ContainerID: args[2], NetNS: args[3], IfName: args[4]}
	if len(args) == 6 {
		if err := json.Unmarshal([]byte(args[5]), &rt.CapabilityArgs); err != nil {
			return fmt.Errorf("capability args: %w", err)
		}
	}
	cni := libcni.NewCNIConfigWithCacheDir(filepath.SplitList(os.Getenv("CNI_PATH")), cacheDir, nil)
	ctx := context.Background()
	switch args[0] {
	case "add":
		result, err := cni.AddNetworkList(ctx, list, rt)
		if err != nil {
			return err
		}
		return result.Print()
	case "check":
		return cni.CheckNetworkList(ctx, list, rt)
	case "del":
		return cni.DelNetworkList(ctx, list, rt)
	}
	return fmt.Errorf("unknown command %q", args[0])
}
