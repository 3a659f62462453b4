// swift-tools-version:6.1
import PackageDescription

let package = Package(
    name: "epokd",
    platforms: [.macOS(.v13)],
    products: [
        .executable(name: "epokd", targets: ["epokd"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.5.0"),
        .package(url: "https://github.com/apple/swift-log", from: "1.6.0"),
        .package(url: "https://github.com/jpsim/Yams", from: "5.0.0"),
        .package(url: "https://github.com/apple/swift-metrics", from: "2.5.0"),
        .package(url: "https://github.com/swift-server/swift-prometheus", from: "2.0.0"),
        .package(url: "https://github.com/apple/swift-nio", from: "2.65.0"),
        .package(url: "https://github.com/apple/swift-collections", from: "1.1.0"),
    ],
    targets: [
        .target(
            name: "CNetfilter",
            linkerSettings: [
                .linkedLibrary("nftnl"),
                .linkedLibrary("mnl"),
                .linkedLibrary("netfilter_conntrack"),
            ]
        ),
        .target(name: "Dataplane", dependencies: ["CNetfilter"]),
        .systemLibrary(name: "CMalloc", path: "Sources/CMalloc"),
        // libcurl is loaded on first use (see CCurl.h), so nothing links it.
        .target(name: "CCurl"),
        .target(
            name: "Control",
            dependencies: [
                "Dataplane",
                "CCurl",
                .product(name: "Logging", package: "swift-log"),
                .product(name: "Metrics", package: "swift-metrics"),
                .product(name: "Yams", package: "Yams"),
                .product(name: "HeapModule", package: "swift-collections"),
                .product(name: "OrderedCollections", package: "swift-collections"),
            ]
        ),
        .executableTarget(
            name: "epokd",
            dependencies: [
                "CMalloc",
                "Control",
                "Dataplane",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
                .product(name: "Logging", package: "swift-log"),
                .product(name: "Metrics", package: "swift-metrics"),
                .product(name: "Prometheus", package: "swift-prometheus"),
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "NIOHTTP1", package: "swift-nio"),
            ],
            exclude: ["function-order.txt"],
            // Release builds link with lld and lay the functions a run executes side by side, in the order of
            // function-order.txt (scripts/function-order.sh writes it): the kernel maps code 64 KiB around each
            // page a process touches, so code spread over the binary's 20 MB costs resident memory.
            linkerSettings: [
                .unsafeFlags(["-use-ld=lld", "-Xlinker", "--symbol-ordering-file=\(Context.packageDirectory)/Sources/epokd/function-order.txt",
                              "-Xlinker", "--no-warn-symbol-ordering"], .when(platforms: [.linux], configuration: .release)),
            ],
            plugins: ["BuildInfo"]
        ),
        .plugin(name: "BuildInfo", capability: .buildTool()),
        .target(name: "NetnsLab", dependencies: ["Dataplane", "CNetfilter"], path: "Tests/NetnsLab"),
        .executableTarget(name: "epokd-bench", dependencies: ["Control", "Dataplane", "NetnsLab", "FakeKube"], path: "Benchmarks/EpokBench"),
        .target(name: "FakeKube", dependencies: ["Control", "NetnsLab"], path: "Tests/FakeKube"),
        .testTarget(name: "DataplaneTests", dependencies: ["Dataplane", "NetnsLab", "CMalloc"]),
        .testTarget(name: "ControlTests", dependencies: ["Control", "Dataplane", "NetnsLab", "FakeKube", .product(name: "Logging", package: "swift-log"),
                                                         .product(name: "MetricsTestKit", package: "swift-metrics")]),
    ],
    swiftLanguageModes: [.v6]
)
