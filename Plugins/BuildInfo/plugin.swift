import Foundation
import PackagePlugin

/// Writes the commit epokd is built from (`git rev-parse`, with `-dirty` for uncommitted changes; `unknown`
/// outside a git checkout) into a Swift file before every build, rewritten only when it changes.
@main
struct BuildInfo: BuildToolPlugin {
    func createBuildCommands(context: PluginContext, target: Target) throws -> [Command] {
        let output = context.pluginWorkDirectoryURL.appending(path: "generated")
        let script = """
            commit=$(git -C "$1" rev-parse --short=12 HEAD 2>/dev/null) || commit=unknown
            if [ "$commit" != unknown ] && [ -n "$(git -C "$1" status --porcelain --untracked-files=no 2>/dev/null | head -1)" ]; then
              commit="$commit-dirty"
            fi
            mkdir -p "$2"
            text="// Generated before every build by Plugins/BuildInfo.
            let buildCommit = \\"$commit\\""
            [ "$(cat "$2/BuildCommit.swift" 2>/dev/null)" = "$text" ] || printf '%s\\n' "$text" > "$2/BuildCommit.swift"
            """
        return [.prebuildCommand(displayName: "Build info (commit)", executable: URL(fileURLWithPath: "/bin/sh"),
                                 arguments: ["-c", script, "sh", context.package.directoryURL.path, output.path],
                                 outputFilesDirectory: output)]
    }
}
