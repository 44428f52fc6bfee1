// swift-tools-version:6.0
// ckpt: streaming conversion of ML checkpoints between the JAX and PyTorch worlds.
import PackageDescription

let package = Package(
    name: "ckpt",
    platforms: [.macOS(.v13)],
    products: [
        .library(name: "Shared", targets: ["Shared"]),
        .executable(name: "ckpt-read", targets: ["ckpt-read"]),
        .executable(name: "ckpt-write", targets: ["ckpt-write"]),
        .executable(name: "lora-merge", targets: ["lora-merge"]),
        .executable(name: "ckpt-slice", targets: ["ckpt-slice"]),
        .executable(name: "ckpt-diff", targets: ["ckpt-diff"]),
        // The five tools in one binary (scripts/package.sh ships it): the tool is named by
        // the name it is run as, or by its first argument.
        .executable(name: "ckpt", targets: ["ckpt"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.5.0"),
    ],
    targets: [
        // The system zlib (Debian: zlib1g-dev): crc32, deflate framing of stream chunks.
        .systemLibrary(name: "CZlib", path: "Sources/CZlib"),
        // The system libzstd (Debian: libzstd-dev): Orbax writes zstd chunks and OCDBT nodes.
        .systemLibrary(name: "CZstd", path: "Sources/CZstd"),
        // CRC-32 by carry-less multiply (PCLMULQDQ), falling back to zlib: checksums are
        // on every stage's hot path and zlib's table code runs at ~2 GB/s.
        .target(name: "CFastCRC", dependencies: ["CZlib"], path: "Sources/CFastCRC", linkerSettings: [.linkedLibrary("z")]),
        // The LoRA merge product W += L·R (small inner rank) with AVX2+FMA when the CPU has it.
        .target(name: "CLowRank", path: "Sources/CLowRank", cSettings: [.unsafeFlags(["-O3"])]),
        // Linux system calls Swift's Glibc module leaves out (splice).
        .target(name: "CLinux", path: "Sources/CLinux"),
        // libcurl, loaded at run time (dlopen) for reading URLs: no link-time dependency.
        .target(name: "CCurl", path: "Sources/CCurl", linkerSettings: [.linkedLibrary("dl")]),
        // The git commit of a packaged build, for --version.
        .target(name: "CBuildInfo", path: "Sources/CBuildInfo"),
        .target(
            name: "Shared",
            dependencies: [
                "CZlib",
                "CZstd",
                "CFastCRC",
                "CLinux",
                "CCurl",
                "CLowRank",
                "CBuildInfo",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
            ]
        ),
        .executableTarget(name: "ckpt-read", dependencies: ["Shared"]),
        .executableTarget(name: "ckpt-write", dependencies: ["Shared"]),
        .executableTarget(name: "lora-merge", dependencies: ["Shared"]),
        .executableTarget(name: "ckpt-slice", dependencies: ["Shared"]),
        .executableTarget(name: "ckpt-diff", dependencies: ["Shared"]),
        .executableTarget(name: "ckpt", dependencies: ["Shared"]),
        // Fuzz targets, one per parser (scripts/fuzz.sh builds it with -DFUZZING and
        // -sanitize=fuzzer,address); a plain build replays inputs through a target.
        .executableTarget(name: "ckpt-fuzz", dependencies: ["Shared"]),
        .testTarget(
            name: "SharedTests",
            dependencies: ["Shared"],
            resources: [.copy("Golden")]
        ),
    ],
    swiftLanguageModes: [.v6]
)
