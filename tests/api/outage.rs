//! Postgres unreachable, and gRPC reflection.

use super::*;

#[sqlx::test]
async fn when_postgres_is_unreachable_cached_decisions_are_served_and_the_rest_is_unavailable(
    _p: PgPoolOptions,
    conn: PgConnectOptions,
) {
    use tonic_health::pb::health_check_response::ServingStatus;

    let proxy = Proxy::start(pg_addr(&conn)).await;
    let mut t = spawn(&proxy.options(&conn), "default").await;
    t.create_tenant("acme", "pro").await;
    let (cached, cached_key) = t.create_key("acme").await;
    let (revoked_meanwhile, revoked_key) = t.create_key("acme").await;
    assert!(t.authenticate(&cached).await.allowed);
    assert!(t.authenticate(&revoked_meanwhile).await.allowed);

    let mut events = t.invalidations();
    proxy.cut();
    wait_for(&mut events, |e| *e == Invalidation::Lost).await;
    // Within the staleness bound the replica stays ready; the `database`
    // health name shows the lost feed.
    assert_eq!(t.health_status().await, ServingStatus::Serving);
    assert_eq!(
        t.service_status("database").await,
        ServingStatus::NotServing
    );

    // Cached decisions keep being served.
    assert!(t.authenticate(&cached).await.allowed);
    // Anything that needs the database is UNAVAILABLE, never a denial.
    let stranger = t.profile.key_format.generate("live");
    let err = t
        .authenticate_with(pb::AuthenticateRequest {
            api_key: stranger.expose().into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");
    let err = t.create_key_with(pb::CreateKeyRequest {
        tenant_id: "acme".into(),
        name: "k".into(),
        ..Default::default()
    });
    assert_eq!(err.await.unwrap_err().code(), tonic::Code::Unavailable);

    // A revocation this replica cannot hear about (made on another replica
    // while its link is down)...
    let mut other = spawn(&conn, "default").await;
    other.revoke(&revoked_key.key_id).await;

    // ...is honoured once the link is back.
    proxy.restore();
    wait_for(&mut events, |e| *e == Invalidation::Ready).await;
    assert_eq!(t.health_status().await, ServingStatus::Serving);
    assert_eq!(t.service_status("database").await, ServingStatus::Serving);
    assert_eq!(
        reason(&t.authenticate(&revoked_meanwhile).await),
        "KEY_REVOKED"
    );
    let r = t.authenticate(&cached).await;
    assert!(r.allowed);
    assert_eq!(r.principal.unwrap().key_id, cached_key.key_id);
}

#[sqlx::test]
async fn grpc_reflection_lists_the_services(_p: PgPoolOptions, conn: PgConnectOptions) {
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    use tonic_reflection::pb::v1::ServerReflectionRequest;

    let t = spawn(&conn, "default").await;
    let mut client = ServerReflectionClient::new(t.channel.clone());
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut responses = client
        .server_reflection_info(futures::stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    let response = responses.message().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = response.message_response else {
        panic!("unexpected reflection response");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for s in [
        "tollgate.v1.AuthService",
        "tollgate.v1.TenantService",
        "grpc.health.v1.Health",
    ] {
        assert!(names.contains(&s.to_string()), "{s} not in {names:?}");
    }
}
