import ArgumentParser
import CBuildInfo
import Glibc

/// The command line was wrong in a way argument parsing alone cannot see.
public struct UsageError: CkptError {
    public var message: String
    public init(_ message: String) { self.message = message }
    public var exitStatus: SysExit { .usage }
    public var description: String { message }
}

/// A stage or option that exists but is not built yet.
public struct NotImplementedError: CkptError {
    public var what: String
    public init(_ what: String) { self.what = what }
    public var exitStatus: SysExit { .unavailable }
    public var description: String { "\(what) is not implemented yet" }
}

public enum Tool {
    /// `--version`: the release, and the commit a packaged build was made from.
    public static let version: String = {
        let commit = String(cString: ckpt_build_commit())
        return release + (commit.isEmpty ? " (development build)" : " (commit \(commit))")
    }()
    public static let release = "0.1.0"

    /// Runs a tool's body: prints any error as one line `tool: message` on stderr and
    /// exits with its sysexits status. A closed downstream pipe (EPIPE on stdout) ends the
    /// process quietly by SIGPIPE, as `cat` does, after partial outputs are removed.
    public static func run(_ name: String, _ body: () throws -> Void) throws {
        signal(SIGPIPE, SIG_IGN)
        // Past a file-size limit (ulimit -f, quotas, schedulers) a write fails with EFBIG,
        // reported like a full disk, instead of SIGXFSZ killing the process before it can
        // remove its temporary files.
        signal(SIGXFSZ, SIG_IGN)
        do {
            try body()
        } catch let e as IOError where e.errno == EPIPE && e.path == FileDescriptor.standardOutput.path {
            signal(SIGPIPE, SIG_DFL)
            raise(SIGPIPE)
            throw ExitCode(128 + SIGPIPE)
        } catch let e as CkptError {
            StandardError.write("\(name): \(e.description)\n")
            throw ExitCode(e.exitStatus.rawValue)
        } catch let e as ExitCode {
            throw e
        } catch {
            StandardError.write("\(name): internal error: \(error)\n")
            throw ExitCode(SysExit.software.rawValue)
        }
    }

    /// A line on stderr (callers that honour `--quiet` check it first).
    public static func note(_ name: String, _ message: String) {
        StandardError.write("\(name): \(message)\n")
    }
}

/// `--progress` / `--quiet`, shared by every tool.
public struct ProgressOptions: ParsableArguments {
    @Flag(help: "Show progress on stderr even when it is not a terminal.")
    public var progress = false

    @Flag(name: [.short, .long], help: "Print nothing on stderr but errors.")
    public var quiet = false

    public init() {}

    public func makeProgress(label: String) -> Progress? {
        if quiet { return nil }
        if progress || isatty(2) == 1 { return Progress(label: label) }
        return nil
    }
}

/// Where a stage writes its stream, and how.
public struct StreamOutputOptions: ParsableArguments {
    @Option(name: [.short, .long], help: "Write the stream here instead of stdout ('-' is stdout).")
    public var output: String = "-"

    @Option(help: ArgumentHelp("Compress stream chunks: none, zstd[:LEVEL] (-7 to 19, default 1; fastest) or zlib[:LEVEL] (0-9, default 1; readable by any zlib). Readers take either without being told.", valueName: "codec"))
    public var compress: String = "none"

    @Flag(help: "Replace an existing output file.")
    public var force = false

    public init() {}

    public func validate() throws {
        guard ChunkCompression(argument: compress) != nil else {
            throw ValidationError("--compress takes none, zlib[:LEVEL] (0-9) or zstd[:LEVEL] (-7 to 19, not 0), not '\(compress)'")
        }
    }

    /// A stream writer on stdout or on an atomically created file.
    public func makeWriter(producer: String) throws -> StreamWriter {
        try StreamOutputOptions.makeWriter(output: output, compression: ChunkCompression(argument: compress)!, force: force, producer: producer)
    }

    /// The same for a caller without these options parsed (`ckpt-write x.ckpts`).
    public static func makeWriter(output: String, compression: ChunkCompression, force: Bool, producer: String) throws -> StreamWriter {
        if output == "-" {
            if FileDescriptor.standardOutput.isTerminal {
                throw UsageError("refusing to write a binary stream to a terminal: redirect stdout or pipe it into another stage")
            }
            return StreamWriter(output: .standardOutput, compression: compression, producer: producer)
        }
        let atomic = try AtomicOutput(path: output, overwrite: force)
        return StreamWriter(output: atomic.descriptor, atomic: atomic, compression: compression, producer: producer)
    }
}

/// Where a stage reads its stream: stdin, or a saved `.ckpts` file.
public func openStreamInput(_ path: String) throws -> StreamReader {
    if path == "-" {
        if FileDescriptor.standardInput.isTerminal {
            throw UsageError("expected a ckpt stream on stdin, but stdin is a terminal: pipe a stage into this one")
        }
        return try StreamReader(.standardInput)
    }
    return try StreamReader(try FileDescriptor.openForReading(path))
}
